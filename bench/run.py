"""Throughput report: this project next to what a user would otherwise pick, in one run.

    python bench/run.py                 # the small grid on a CPU (under 2 minutes), the full on CUDA
    python bench/run.py --full          # the full grid on a CPU too (several minutes)
    python bench/run.py --only attention --dtype bfloat16 --out bench/out
    python bench/run.py --only gpt_train --profile   # where each training step's time goes

Every implementation is timed in this process, on the same inputs, after a warm-up, and checked
against the oracle first (a wrong one is reported, not timed). CUDA timings come from
triton.testing.do_bench (median, p20, p80; it flushes L2 between runs, and the inputs rotate
between two copies as well); CPU timings from time.perf_counter, repeated, median.
Writes OUT/results.json, OUT/results.csv and, with matplotlib, OUT/attention.png. On CUDA the
JSON also goes to bench/results/<device>-<date>[-<only>][-<dtype>].json (written after every
grid point, "complete": true at the end), so a grid too long for one sitting can be run in
parts, e.g. --only gpt_train --only generate, then --only attention --dtype bfloat16. The report
also lists the Triton autotuner's choices, with each timed config's median ("autotune"), and
what backend="auto" measured and chose per class of calls ("auto", kernels/auto.py).

Sections (one module each, each a registry of implementations): bench/attention.py,
bench/varlen.py (packed documents), bench/flash_api.py (flash-attn's call with a window),
bench/decode.py (a generation step against a KV cache), bench/gpt_train.py, bench/generate.py,
bench/speedrun.py (GPU only); what they share is in bench/harness.py.
"""
import argparse
import datetime
import os
import re
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python puts bench/ on sys.path, never the repository root (whose kernels/ would shadow Hugging
# Face's `kernels`): lecture_flash comes from its install (pip install -e .).
import harness  # noqa: E402  (first: it says how to install lecture_flash if it is missing)

import torch  # noqa: E402

import attention, decode, flash_api, generate, gpt_train, harness, speedrun, varlen  # noqa: E402
import lecture_flash  # noqa: E402
from lecture_flash import default_device  # noqa: E402

# Section name -> module with run(opts, rows, save), print_table(rows, opts) and verdict(rows,
# opts) (plain summary lines), in the report's order.
SECTIONS = {"attention": attention, "varlen": varlen, "flash_api": flash_api, "decode": decode,
            "gpt_train": gpt_train, "generate": generate, "speedrun": speedrun}
# The short sections run first, so a run cut short in the long attention grid still has them
# (the speedrun, minutes on a GPU and skipped elsewhere, last).
RUN_ORDER = ("gpt_train", "generate", "varlen", "flash_api", "decode", "attention", "speedrun")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autotune_report():
    """The Triton kernels' tile choices in this run (and each config's timing), or [] without
    Triton: which config wins, and by how much, says where tuning effort would pay."""
    try:
        from lecture_flash import flash
    except ImportError:
        return []
    return flash.autotune_report()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="dtypes (repeatable): attention's and varlen's (default bfloat16+float16 on "
                        "CUDA, float32 on CPU), and gpt_train's among bfloat16 (autocast) and "
                        "float32 (default both on CUDA, float32 on CPU)")
    p.add_argument("--only", choices=sorted(SECTIONS), action="append",
                   help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="the small grid (the default on a CPU: under 2 minutes on 2 cores)")
    p.add_argument("--full", action="store_true",
                   help="the full grid (the default on CUDA; on a CPU several minutes, the "
                        "compiled rows included)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="folder for results.json/csv/png")
    p.add_argument("--autotune", action="store_true",
                   help="time every config at each kernel specialisation's first launch and keep "
                        "the fastest (the report's \"autotune\" section; bench/tuned_configs.py "
                        "makes kernels/flash_tuned.py of such GPU reports)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each training step: OUT/profile-*.txt, and GPU-busy and "
                        "attention-kernel ms per step in the gpt_train rows")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = default_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    if args.quick and args.full:
        sys.exit("error: --quick and --full ask for two grids; pass one")
    # The small grid unless --full, on a CPU (a newcomer's first run); the full one on CUDA.
    args.quick = args.quick or (device.type == "cpu" and not args.full)
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else (
        [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32])
    sections = args.only or list(SECTIONS)
    if args.autotune:
        try:
            from lecture_flash import flash_launch
            flash_launch._TUNER.autotune = True
        except ImportError:
            sys.exit("error: --autotune tunes the Triton kernels, and triton is not installed")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

    out_dir = Path(args.out)
    opts = types.SimpleNamespace(device=device, dtypes=dtypes, quick=args.quick,
                                 dtypes_given=bool(args.dtype),
                                 profile_dir=out_dir if args.profile else None)
    report = {"device": harness.device_name(device), "versions": harness.versions(),
              "commit": harness.commit(ROOT),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": {"quick": args.quick, "sections": sections, "autotune": args.autotune,
                           "dtypes": [str(d).replace("torch.", "") for d in dtypes],
                           # the opt-in Hopper forward (kernels/hopper.py), where it applies
                           "hopper": os.environ.get("LECTURE_FLASH_HOPPER") or None},
              **{name: [] for name in SECTIONS}}
    paths = [out_dir]
    if device.type == "cuda" and not args.quick:
        # A grid split over several runs (--only, --dtype) leaves one report per part.
        part = "".join(f"-{x}" for x in (args.only or []) + (args.dtype or []))
        slug = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-").lower()
        paths.append(ROOT / "bench" / "results" / f"{slug}-{report['date'][:10]}{part}.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # The report is written after each grid point and section, and marked complete at the end,
    # so a run cut short still leaves an honest (partial) file.
    def save(final=False):
        report["seconds"] = round(time.time() - t0, 1)
        report["autotune"] = autotune_report()
        report["auto"] = lecture_flash.auto_report()  # backend="auto"'s measured choice per class
        report["complete"] = final
        harness.write_report(report, SECTIONS, paths)

    print(f"device: {report['device']}; versions: {report['versions']}; date: {report['date']}; "
          f"commit: {report['commit']}", flush=True)
    if report["settings"]["hopper"]:
        print(f"LECTURE_FLASH_HOPPER={report['settings']['hopper']}: the triton rows' forward is "
              "kernels/hopper.py's where it applies", flush=True)
    for name in RUN_ORDER:  # each section's table as soon as it is measured
        if name in sections:
            SECTIONS[name].run(opts, report[name], save)
            SECTIONS[name].print_table(report[name], opts)
            sys.stdout.flush()
    save(final=True)
    if report["attention"]:
        try:
            attention.plot(report, out_dir / "attention.png")
        except ImportError:
            harness.log("matplotlib is not installed: no attention.png (pip install -e '.[plot]')")

    noisy = harness.untrusted(report, SECTIONS)
    timed = sum(1 for name in SECTIONS for r in report[name] if r.get("ms", r.get("ms_per_iter")))
    if noisy:
        save(final=True)  # the rows now say which timings are noisy
        print(f"\n== noisy timings: {len(noisy)} of {timed} ==\n"
              f"The machine was busy during these (their repeats spread past "
              f"{harness.NOISY_SPREAD:.0%} of the median, or a forward outlasted its "
              "forward+backward), so ratios that involve them are not to be trusted; rerun on a "
              "quiet machine:")
        print("\n".join(noisy))
    verdicts = [line for name in SECTIONS for line in SECTIONS[name].verdict(report[name], opts)]
    if verdicts:
        print("\n== verdict ==")
        print("\n".join(verdicts))
    print(f"\nwrote {out_dir}/results.json, results.csv ({report['seconds']} s)"
          + "".join(f" and {p}" for p in paths[1:]))


if __name__ == "__main__":
    main()
