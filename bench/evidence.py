"""Everything a GPU must show, in one bounded call.

    pip install --no-deps --no-build-isolation -e .     # the GPU image reaches no registry
    python bench/evidence.py                             # default budget: 8 minutes
    python bench/evidence.py --budget-s 300 --out /tmp/evidence

A GPU is lent rarely and briefly, so this runs what matters most first and stops cleanly at its
budget (a step that cannot finish in what is left is not started; a long step stops between
its points):

  1. gpu_tests   pytest -m gpu: the correctness of every path that only a GPU runs
  2. host        host time per call on the smallest input, ours against SDPA's backends
  3. attention   bf16 causal attention at the lecture's shape and T 1k/4k/16k, D 64/128,
                 forward and forward+backward: ours, auto, every SDPA backend, FlexAttention
  4. training    the lecture's training step (ours eager, compiled, captured; nanoGPT-style
                 SDPA eager and compiled; the lecture's) and generation
  5. hopper      the opt-in sm_90 forward beside the portable one
  6. features    grouped heads, packed rows, a sliding window (flash-attn's call), decode steps

The report (bench/run.py's schema, plus "gpu_tests", "host" and "evidence": each
step's status and seconds) is written after every step, marked complete or cut at the step it
stopped before: bench/results/<device>-<date>-evidence.json on a GPU (commit it), and under
--out. It ends with a table of the steps and the sections' verdict lines. On a CPU it runs the
same steps at tiny sizes (tests/test_bench.py runs it once).
"""
import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
import harness  # noqa: E402  (first: it says how to install lecture_flash if it is missing)

import torch  # noqa: E402

import attention, decode, flash_api, generate, gpt_train, host_overhead, varlen  # noqa: E402
import lecture_flash  # noqa: E402
from lecture_flash import causal_attention, default_device  # noqa: E402

# The report's timing sections, run.py's schema (each module prints and judges its own rows).
SECTIONS = {"attention": attention, "varlen": varlen, "flash_api": flash_api, "decode": decode,
            "gpt_train": gpt_train, "generate": generate}
ATTENTION_IMPLS = ["triton", "project-auto", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                   "sdpa-math", "flex"]


def _step_gpu_tests(ctx):
    """pytest -m gpu in a child process, given what is left of the budget."""
    pytest = shutil.which("pytest", path=str(Path(sys.executable).parent)) or "pytest"
    command = [pytest, "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LECTURE_FLASH_TESTS"))}
    limit = max(10.0, min(ctx.remaining() - ctx.reserve, 0.45 * ctx.budget))
    t0 = time.time()
    result = {"command": "pytest -m gpu", "timed_out": False}
    try:
        done = subprocess.run(command, cwd=ROOT / "tests", env=env, capture_output=True, text=True,
                              timeout=limit)
        out, result["rc"] = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        result.update(rc=None, timed_out=True)
    for word in ("passed", "failed", "skipped", "error", "deselected"):
        found = re.findall(rf"(\d+) {word}", out)
        result[word] = int(found[-1]) if found else 0
    result["failures"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)[:50]
    result["seconds"] = round(time.time() - t0, 1)
    ctx.report["gpu_tests"] = result
    harness.log(f"  gpu_tests: {result['passed']} passed, {result['failed']} failed, "
                f"{result['skipped']} skipped{' (cut at the budget)' if result['timed_out'] else ''}")


def _step_host(ctx):
    if ctx.device.type == "cpu" and not lecture_flash.flash.INTERPRET:
        ctx.report["host"] = [{"skipped": "ours needs CUDA or TRITON_INTERPRET=1 here"}]
        return
    calls, repeats = (500, 7) if ctx.device.type == "cuda" else (100, 3)
    rows, shape, dtype = host_overhead.host_rows(ctx.device, calls, repeats)
    ctx.report["host"] = [dict(r, shape=list(shape), dtype=dtype) for r in rows]


def _attention_points(ctx):
    """(dtype, B, H, T, D, Hk): the lecture's shape, then T 1k/4k/16k at 16k tokens, D 64 and
    128 (B * H * T fixed: similar work per point); tiny ones on a CPU."""
    if ctx.device.type != "cuda":
        return [(torch.float32, 2, 2, T, 16, 2) for T in (32, 64)]
    s = attention.LECTURE_SHAPE
    points = [(torch.bfloat16, s["B"], s["H"], s["T"], s["D"], s["H"])]
    for D in (64, 128):
        for T in (1024, 4096, 16384):
            H = 2048 // D
            points.append((torch.bfloat16, max(1, 16384 // T), H, T, D, H))
    return points


def _step_attention(ctx):
    ctx.sections_run(attention, _attention_points(ctx), ATTENTION_IMPLS)


def _step_training(ctx):
    opts = ctx.opts(preset=None if ctx.device.type == "cuda" else "tiny",
                    dtypes=[torch.bfloat16] if ctx.device.type == "cuda" else [torch.float32],
                    dtypes_given=True)
    for module in (gpt_train, generate):
        if ctx.remaining() < ctx.reserve:
            ctx.cut_inside = module.__name__
            return
        module.run(opts, ctx.report[module.__name__], ctx.save)


def _hopper(device, quick):
    """The opt-in sm_90 forward (kernels/hopper.py), where it applies: LECTURE_FLASH_HOPPER=1."""
    from lecture_flash import hopper
    if device.type != "cuda" or torch.version.hip or torch.cuda.get_device_capability(device) != (9, 0):
        return "an sm_90 GPU (H100, H200) only"

    def attend(q, k, v):
        saved, hopper.MODE = hopper.MODE, "1"
        try:
            return causal_attention(q, k, v, backend="triton")
        finally:
            hopper.MODE = saved
    return attend


def _step_hopper(ctx):
    points = [p for p in _attention_points(ctx) if p[3] == 4096] or _attention_points(ctx)[:1]
    attention.IMPLS["triton-hopper"] = _hopper  # this step's row, beside step 3's "triton"
    try:
        ctx.sections_run(attention, points, ["triton-hopper"])
    finally:
        del attention.IMPLS["triton-hopper"]


def _step_features(ctx):
    cuda = ctx.device.type == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    gqa = [(dt, 4, 32, 4096, 128, 8)] if cuda else [(dt, 2, 4, 64, 16, 2)]
    ctx.sections_run(attention, gqa, ATTENTION_IMPLS)
    docs = varlen.DOC_LENGTHS if cuda else (40, 24, 9)
    ctx.sections_run(varlen, [(dt, 16, 16, 128, docs) if cuda else (dt, 2, 2, 16, docs)], None)
    ctx.sections_run(flash_api, [(dt, 8, 2048, 10, 10, 128, 768) if cuda
                                 else (dt, 2, 64, 2, 2, 16, 16)], None)
    ctx.sections_run(decode, decode.points(ctx.device, [dt], not cuda), None)


STEPS = [("gpu_tests", _step_gpu_tests), ("host", _step_host), ("attention", _step_attention),
         ("training", _step_training), ("hopper", _step_hopper), ("features", _step_features)]


class Run:
    """One evidence run: the budget, the report and where it goes."""

    def __init__(self, device, budget, paths, reserve):
        self.device, self.budget, self.paths, self.reserve = device, budget, paths, reserve
        self.t0 = time.time()
        self.cut_inside = None
        date = datetime.datetime.now(datetime.timezone.utc)
        self.report = {"device": harness.device_name(device), "versions": harness.versions(),
                       "commit": harness.commit(ROOT), "date": date.isoformat(timespec="seconds"),
                       "settings": {"command": "python bench/evidence.py", "budget_s": budget,
                                    "quick": device.type != "cuda", "evidence": True},
                       **{name: [] for name in SECTIONS}, "gpu_tests": None, "host": [],
                       "evidence": {"steps": [], "cut_at": None}}

    def remaining(self):
        return self.budget - (time.time() - self.t0)

    def opts(self, **extra):
        """A section's options (run.py's), tiny on a CPU; extra: points, impls, preset, ..."""
        quick = self.device.type != "cuda"
        base = dict(device=self.device, quick=quick, dtypes_given=False, profile_dir=None,
                    dtypes=[torch.float32 if quick else torch.bfloat16])
        return types.SimpleNamespace(**{**base, **extra})

    def sections_run(self, module, points, impls):
        """module.run over `points` one at a time (the budget checked between them)."""
        for point in points:
            if self.remaining() < self.reserve:
                self.cut_inside = module.__name__
                return
            module.run(self.opts(points=[point], impls=impls), self.report[module.__name__],
                       self.save)

    def save(self, final=False):
        self.report["seconds"] = round(time.time() - self.t0, 1)
        self.report["auto"] = lecture_flash.auto_report()
        self.report["complete"] = final and self.report["evidence"]["cut_at"] is None
        harness.write_report(self.report, SECTIONS, self.paths)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop cleanly within this many seconds (default 480: 8 minutes)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "evidence"),
                   help="folder for a copy of the report (results.json, results.csv)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--no-results", action="store_true",
                   help="on a GPU, do not write bench/results/<device>-<date>-evidence.json")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = default_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    # A step is not started with less than this left (a GPU's compiles and a model's warm-up
    # take tens of seconds); on a CPU the steps are tiny.
    reserve = 45.0 if device.type == "cuda" else 2.0
    paths = [Path(args.out)]
    run = Run(device, args.budget_s, paths, reserve)
    if device.type == "cuda" and not args.no_results:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", run.report["device"]).strip("-").lower()
        paths.append(ROOT / "bench" / "results" / f"{slug}-{run.report['date'][:10]}-evidence.json")
    print(f"device: {run.report['device']}; versions: {run.report['versions']}; commit: "
          f"{run.report['commit']}; budget {args.budget_s:.0f} s", flush=True)
    for i, (name, step) in enumerate(STEPS, 1):
        if run.remaining() < reserve:
            run.report["evidence"]["cut_at"] = f"step {i} ({name})"
            break
        t0 = time.time()
        status = "done"
        try:
            step(run)
        except Exception as e:  # a step that breaks is reported; the next ones still run
            status = f"failed: {harness.skipped_reason(e)}"
        if run.cut_inside is not None:
            status, run.cut_inside = f"cut at the budget (in {run.cut_inside})", None
            run.report["evidence"]["cut_at"] = f"step {i} ({name}), inside"
        run.report["evidence"]["steps"].append(dict(step=name, status=status,
                                                    seconds=round(time.time() - t0, 1)))
        harness.log(f"step {i} {name}: {status} ({time.time() - t0:.0f} s)")
        run.save()
        if run.report["evidence"]["cut_at"] is not None:
            break
    run.save(final=True)
    summary(run.report, run.opts())
    print(f"\nwrote {paths[0]}/results.json" + "".join(f" and {p}" for p in paths[1:]))


def summary(report, opts):
    """The steps' table, then the sections' verdict lines and the host figures."""
    print("\n== evidence ==")
    for s in report["evidence"]["steps"]:
        print(f"{s['step']:10} {s['seconds']:7.1f} s  {s['status']}")
    state = "complete" if report["complete"] else f"cut at {report['evidence']['cut_at']}"
    print(f"{'':10} {report['seconds']:7.1f} s  {state}")
    lines = [line for name, module in SECTIONS.items() for line in module.verdict(report[name], opts)]
    tests = report.get("gpu_tests")
    if tests:
        lines.insert(0, f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, "
                        f"{tests['skipped']} skipped" + (" (cut at the budget)" if tests["timed_out"] else ""))
    host = {(r.get("launches"), r.get("path")): r for r in report["host"]}
    ours = host.get(("launched", "causal_attention")) or host.get(("stubbed", "causal_attention"))
    theirs = [r for (kind, _), r in host.items() if kind in ("launched", "cpu") and "sdpa" in r["path"]
              and r.get("fwd_us")]
    if ours and theirs and ours.get("fwd_us"):
        best = min(theirs, key=lambda r: r["fwd_us"])
        lines.append(f"host per call: ours {ours['fwd_us']:.1f} us forward, {ours['fwd_bwd_us']:.1f} "
                     f"us forward+backward ({ours['launches']}); {best['path']} {best['fwd_us']:.1f} "
                     f"and {best['fwd_bwd_us']:.1f} us")
    if lines:
        print("\n== verdict ==")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
