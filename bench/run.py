"""Throughput report: this project next to what a user would otherwise pick, in one run.

    python bench/run.py                 # the default grid for this machine's device
    python bench/run.py --quick         # a small grid (under 2 minutes on 2 CPU cores)
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
also lists the Triton autotuner's choices, with each timed config's median ("autotune").
"""
import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpt import GPT, GPTConfig  # noqa: E402
from gpt.lecture import GPTLanguageModel, per_head_attention  # noqa: E402
from kernels import available_backends, causal_attention  # noqa: E402
from kernels.reference import causal_attention_reference, naive_causal_attention  # noqa: E402

SECTIONS = ("attention", "gpt_train", "generate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LECTURE_SHAPE = dict(B=64, H=6, T=256, D=64)
# Model configs: the lecture's final gpt.py, and its first ("small") one for CPUs.
LECTURE_CFG = dict(block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.2, batch_size=64)
SMALL_CFG = dict(block_size=32, n_embd=64, n_head=4, n_layer=4, dropout=0.0, batch_size=16)
VOCAB = 65


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, min_time=0.5, max_reps=50):
    """(median, p20, p80) milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=25, rep=60, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def peak_memory_mb(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# Kernels of an attention implementation (ours, SDPA's backends, FlexAttention), by name.
ATTENTION_KERNELS = re.compile(r"attn|attention|flash|fmha|cudnn|_bwd_preprocess|dropout_mask", re.I)


def profile_steps(step, device, path, n=3):
    """Profile n calls of step(): write the op table to `path` and return where the time went
    (per call): wall ms, GPU-busy ms and attention-kernel ms (GPU only). GPU busy well under
    wall means the host (Python, launches) is the bottleneck, not the kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / n
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(events.table(sort_by=sort, row_limit=25))
    found = dict(profile_wall_ms=wall)
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        found["gpu_busy_ms"] = sum(e.self_device_time_total for e in kernels) / 1e3 / n
        found["attention_kernels_ms"] = sum(e.self_device_time_total for e in kernels
                                            if ATTENTION_KERNELS.search(e.key)) / 1e3 / n
    return found


def skipped_reason(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text.split('. ')[0][:160]}"


# ----------------------------------------------------------------------------------------------
# Attention implementations: name -> (q, k, v) -> out, or a string saying why not here
# ----------------------------------------------------------------------------------------------

def _sdpa_forced(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"FlexAttention is not in this torch ({e})"
    compiled = torch.compile(flex_attention, dynamic=True)  # one compile for every length
    masks = {}

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def run(q, k, v):
        key = (q.shape[-2], k.shape[-2], q.device)
        if key not in masks:
            masks[key] = create_block_mask(causal, None, None, key[0], key[1], device=q.device)
        return compiled(q, k, v, block_mask=masks[key])
    return run


def _triton_atomic_dq(q, k, v):
    """Ours with the non-deterministic backward (dQ added atomically by the dK/dV kernel)."""
    return causal_attention(q, k, v, backend="triton", deterministic=False)


def attention_impls(device, quick):
    from torch.nn.attention import SDPBackend
    impls = {
        "lecture": per_head_attention,
        "naive-batched": naive_causal_attention,
        "sdpa-flash": _sdpa_forced(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": _sdpa_forced(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-cudnn": _sdpa_forced(SDPBackend.CUDNN_ATTENTION),
        "sdpa-math": _sdpa_forced(SDPBackend.MATH),
    }
    if quick and device.type == "cpu":
        why = "compiling takes longer than --quick allows on a CPU"
        impls["flex"] = impls["compiled-naive"] = why
    else:
        impls["flex"] = _flex()
        impls["compiled-naive"] = torch.compile(naive_causal_attention, dynamic=True)
    if "triton" in available_backends(device) and device.type == "cuda":
        impls["triton"] = lambda q, k, v: causal_attention(q, k, v, backend="triton")
        impls["triton-atomic-dq"] = _triton_atomic_dq
    else:
        impls["triton"] = impls["triton-atomic-dq"] = "needs a CUDA GPU and triton"
    impls["project-auto"] = lambda q, k, v: causal_attention(q, k, v)
    return impls


def check_forward(impl, q, k, v):
    """None if impl's output on the first head obeys the tolerance rule of the tests, else why."""
    with torch.no_grad():
        out = impl(q, k, v)[:1, :1]
        qs, ks, vs = q[:1, :1], k[:1, :1], v[:1, :1]
        ref = causal_attention_reference(qs.double(), ks.double(), vs.double())
        base = (naive_causal_attention(qs, ks, vs).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    if not err <= 2 * base + 1e-5:
        return f"wrong: max|err| {err:.2e} > 2 x {base:.2e} (PyTorch's own) + 1e-5"
    return None


def attention_grid(device, dtypes, quick):
    """(dtype, B, H, T, D) points. B*H shrinks as T grows so each call does similar work."""
    if device.type == "cuda":
        Ts = (256, 1024, 4096) if quick else (256, 512, 1024, 2048, 4096, 8192, 16384)
        Ds, tokens, width = (64, 128), 16384, 2048
    else:
        Ts = (128, 256) if quick else (128, 256, 512, 1024)
        Ds, tokens, width = (64,), 1024 if quick else 2048, 384
    points = [(dt, max(1, tokens // T), width // D, T, D) for dt in dtypes for D in Ds for T in Ts]
    if not quick:
        points += [(dt, LECTURE_SHAPE["B"], LECTURE_SHAPE["H"], LECTURE_SHAPE["T"], LECTURE_SHAPE["D"])
                   for dt in dtypes]
    return points


def bench_attention(device, dtypes, quick, log, rows=None, save=lambda: None):
    """Time every implementation over the grid; rows are appended to `rows` and save() is
    called after each grid point, so a run cut short keeps what it measured."""
    impls = attention_impls(device, quick)
    rows = [] if rows is None else rows
    for dtype, B, H, T, D in attention_grid(device, dtypes, quick):
        torch.manual_seed(0)
        sets = [[torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
                for _ in range(2)]
        plain = [[t.detach() for t in qkv] for qkv in sets]  # forward-only: some kernels refuse grads
        do = torch.randn(B, H, T, D, device=device, dtype=dtype)
        flops = 4 * B * H * T * T * D / 2  # causal: half of the two (T x T x D) matmuls
        base = dict(dtype=str(dtype).replace("torch.", ""), B=B, H=H, T=T, D=D)
        for name, impl in impls.items():
            wrong = None
            if isinstance(impl, str):
                for p in ("fwd", "fwd+bwd"):
                    rows.append(dict(impl=name, **{"pass": p}, **base, skipped=impl))
                continue
            try:
                wrong = check_forward(impl, *plain[0])
            except Exception as e:  # cannot run here (no kernel for this dtype/device, OOM...)
                wrong = f"skipped: {skipped_reason(e)}"
            for p in ("fwd", "fwd+bwd"):
                row = dict(impl=name, **{"pass": p}, **base)
                if wrong:
                    row["skipped"] = wrong
                    rows.append(row)
                    continue
                cycle = itertools.cycle(plain if p == "fwd" else sets)
                if p == "fwd":
                    def fn():
                        with torch.no_grad():
                            impl(*next(cycle))
                else:
                    def fn():
                        qkv = next(cycle)
                        impl(*qkv).backward(do)
                        for t in qkv:
                            t.grad = None
                try:
                    ms, p20, p80 = measure(fn, device)
                    mem = peak_memory_mb(fn, device)
                except Exception as e:
                    row["skipped"] = skipped_reason(e)
                    rows.append(row)
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                fl = flops * (2.5 if p == "fwd+bwd" else 1.0)
                row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=fl / ms / 1e9, peak_mem_mb=mem)
                rows.append(row)
            log(f"  attention {base['dtype']} B={B} H={H} T={T} D={D} {name}: "
                + ", ".join(f"{r['pass']} {r['ms']:.3f} ms" if "ms" in r else f"{r['pass']} {r['skipped']}"
                            for r in rows[-2:]))
        del sets, plain, do
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    return rows


# ----------------------------------------------------------------------------------------------
# GPT training step and generation
# ----------------------------------------------------------------------------------------------

def matmul_peak_tflops(device, dtype):
    """Peak of a large matmul measured in this run (the MFU denominator)."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = measure(lambda: a @ b, device)[0]
    return 2 * n**3 / ms / 1e9


def build_model(impl, cfg, device):
    shape = {k: cfg[k] for k in ("block_size", "n_embd", "n_head", "n_layer", "dropout")}
    if impl == "lecture":
        return GPTLanguageModel(VOCAB, **shape).to(device)
    backend = "sdpa" if impl == "sdpa-batched" else "auto"
    return GPT(GPTConfig(vocab_size=VOCAB, backend=backend, **shape)).to(device)


def model_cfg(device):
    """The lecture's model on a GPU, its small first config on a CPU."""
    return LECTURE_CFG if device.type == "cuda" else SMALL_CFG


def bench_gpt_train(device, quick, log, profile_dir=None):
    cfg = model_cfg(device)
    B, T = cfg["batch_size"], cfg["block_size"]
    runs = [("float32", None)] if device.type == "cpu" else [("bfloat16", torch.bfloat16), ("float32", None)]
    L, H, hs = cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    rows = []
    for dtype_name, amp in runs:
        peak = matmul_peak_tflops(device, amp or torch.float32) if device.type == "cuda" else None
        steps, skipped = {}, {}
        for impl in ("lecture", "sdpa-batched", "project", "project-compiled"):
            if impl == "project-compiled" and quick and device.type == "cpu":
                skipped[impl] = "compiling takes longer than --quick allows on a CPU"
                continue
            try:
                steps[impl] = make_train_step(impl, cfg, device, amp)
            except Exception as e:
                skipped[impl] = skipped_reason(e)
        times = {impl: [] for impl in steps}
        if device.type == "cuda":
            for impl, (step, _) in steps.items():
                times[impl] = [measure(step, device)[0]]
        else:  # round-robin, so that drift on a shared CPU hits every implementation alike
            for _ in range(5 if quick else 10):
                for impl, (step, _) in steps.items():
                    t0 = time.perf_counter()
                    step()
                    times[impl].append((time.perf_counter() - t0) * 1e3)
        for impl in ("lecture", "sdpa-batched", "project", "project-compiled"):
            if impl in skipped:
                rows.append(dict(impl=impl, dtype=dtype_name, skipped=skipped[impl]))
                continue
            step, n_params = steps[impl]
            ms = statistics.median(times[impl])
            flops_per_token = 6 * n_params + 12 * L * H * hs * T  # PaLM's estimate, as nanoGPT
            tok_s = B * T / (ms / 1e3)
            rows.append(dict(impl=impl, dtype=dtype_name, tokens_per_s=tok_s, ms_per_iter=ms,
                             mfu=flops_per_token * tok_s / (peak * 1e12) if peak else None,
                             peak_mem_mb=peak_memory_mb(step, device), B=B, T=T,
                             mfu_peak=f"measured 8192^3 {dtype_name} matmul: {peak:.0f} TFLOP/s" if peak else None))
            log(f"  gpt_train {dtype_name} {impl}: {ms:.1f} ms/iter, {tok_s:,.0f} tokens/s")
            if profile_dir is not None:
                found = profile_steps(step, device, profile_dir / f"profile-gpt_train-{dtype_name}-{impl}.txt")
                rows[-1].update(found)
                log("    profile: " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()))
        del steps
    return rows


def make_train_step(impl, cfg, device, amp):
    """A warmed-up closure doing one full training step, and the model's parameter count."""
    torch.manual_seed(0)
    model = build_model(impl, cfg, device)
    step_model = torch.compile(model) if impl == "project-compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x = torch.randint(VOCAB, (cfg["batch_size"], cfg["block_size"]), device=device)
    y = torch.randint(VOCAB, (cfg["batch_size"], cfg["block_size"]), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = step_model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()  # warm-up (and compilation)
    sync(device)
    return step, sum(p.numel() for p in model.parameters())


def bench_generate(device, quick, log):
    """Tokens/s at batch 1. "project" is a whole run as a user makes it (one-token prompt);
    project:cache times only the in-cache regime (block_size - 1 tokens from a one-token prompt)
    and project:window only the past-block_size regime (a block_size prompt)."""
    cfg = model_cfg(device)
    bs = cfg["block_size"]
    new = 2000 if device.type == "cuda" else (300 if quick else 1000)
    runs = [("lecture", 1, new), ("project", 1, new), ("project:cache", 1, bs - 1),
            ("project:window", bs, min(new, 4 * bs))]
    rows = []
    for name, prompt_len, n in runs:
        torch.manual_seed(0)
        model = build_model("lecture" if name == "lecture" else "project", cfg, device).eval()
        idx = torch.randint(VOCAB, (1, prompt_len), device=device)
        try:
            g = torch.Generator(device=device).manual_seed(0)
            model.generate(idx, min(n, 2 * bs + 2), generator=g)  # warm-up, through both regimes
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(idx, n, generator=g)
            sync(device)
            dt = time.perf_counter() - t0
        except Exception as e:
            rows.append(dict(impl=name, skipped=skipped_reason(e)))
            continue
        assert out.shape == (1, prompt_len + n)
        rows.append(dict(impl=name, tokens_per_s=n / dt, new_tokens=n, prompt_tokens=prompt_len,
                         block_size=bs, n_layer=cfg["n_layer"], n_embd=cfg["n_embd"]))
        log(f"  generate {name}: {n} tokens, {n / dt:,.1f} tokens/s")
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def autotune_report():
    """The Triton kernels' tile choices in this run (and each config's timing), or [] without
    Triton: which config wins, and by how much, says where tuning effort would pay."""
    try:
        from kernels import flash
    except ImportError:
        return []
    return flash.autotune_report()


def versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": tv,
            "cuda": torch.version.cuda}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_attention(rows):
    if not rows:
        return
    print("\n== attention (causal; TFLOP/s count 4*B*H*T*T*D/2 forward, 2.5x that for fwd+bwd) ==")
    groups = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["D"], r["pass"], r["B"], r["H"], r["T"]), []).append(r)
    print(f"{'dtype':9} {'pass':8} {'B':>4} {'H':>3} {'T':>6} {'D':>4}  {'impl':16} {'ms':>9} {'TFLOP/s':>8} "
          f"{'vs lecture':>10} {'vs best sdpa':>12}  note")
    for key, rs in groups.items():
        lecture = next((r.get("ms") for r in rs if r["impl"] == "lecture"), None)
        sdpa = [r["ms"] for r in rs if r["impl"].startswith("sdpa-") and "ms" in r]
        best = min(sdpa) if sdpa else None
        for r in rs:
            ms = r.get("ms")
            vl = f"{lecture / ms:.2f}x" if ms and lecture else "-"
            vs = f"{best / ms:.2f}x" if ms and best else "-"
            print(f"{r['dtype']:9} {r['pass']:8} {r['B']:>4} {r['H']:>3} {r['T']:>6} {r['D']:>4}  {r['impl']:16} "
                  f"{fmt(ms, '9.3f')} {fmt(r.get('tflops'), '8.1f')} {vl:>10} {vs:>12}  {r.get('skipped', '')}")
        print()


def print_rows(title, rows, metric, baseline="lecture"):
    if not rows:
        return
    print(f"\n== {title} ==")
    for key in sorted({r.get("dtype", "") for r in rows}):
        rs = [r for r in rows if r.get("dtype", "") == key]
        base = next((r.get(metric) for r in rs if r["impl"] == baseline), None)
        sdpa = next((r.get(metric) for r in rs if r["impl"] == "sdpa-batched"), None)
        for r in rs:
            v = r.get(metric)
            extra = "" if "mfu" not in r else f" mfu {fmt(r['mfu'] and 100 * r['mfu'], '5.1f')}%"
            ratio = f"{v / base:6.2f}x lecture" if v and base else ""
            ratio += f" {v / sdpa:6.2f}x sdpa-batched" if v and sdpa and "sdpa-batched" != r["impl"] else ""
            print(f"{key:9} {r['impl']:24} {fmt(v, '14,.1f')} {metric}{extra} {ratio} {r.get('skipped', '')}")


def write_outputs(report, out_dir, log, results_file=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    if results_file is not None:
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(report, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "impl", "key", "metric", "value", "device", "torch", "date"])
        for section in SECTIONS:
            for r in report[section]:
                key = ";".join(f"{k}={r[k]}" for k in ("pass", "dtype", "B", "H", "T", "D", "new_tokens") if k in r)
                for metric, value in r.items():
                    if metric in ("impl", "pass", "dtype", "B", "H", "T", "D") or value is None:
                        continue
                    w.writerow([section, r["impl"], key, metric, value, report["device"],
                                report["versions"]["torch"], report["date"]])
    if report.get("complete"):
        try:
            plot_attention(report, out_dir / "attention.png")
        except ImportError:
            log("matplotlib is not installed: no attention.png (pip install -e '.[plot]')")


def plot_attention(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report["attention"] if "tflops" in r and r["B"] * r["T"] != 64 * 256 or "tflops" in r and r["H"] != 6]
    panels = sorted({(r["D"], r["pass"]) for r in rows})
    if not panels:
        return
    dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in rows) else rows[0]["dtype"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (D, p) in zip(axes[0], panels):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["T"], r["tflops"]) for r in rows if r["impl"] == impl and r["D"] == D
                         and r["pass"] == p and r["dtype"] == dtype)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype}, D={D}, {p}")
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(report["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="attention dtypes (repeatable; default bfloat16+float16 on CUDA, float32 on CPU)")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="a small grid")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="folder for results.json/csv/png")
    p.add_argument("--profile", action="store_true",
                   help="also profile each training step: OUT/profile-*.txt, and GPU-busy and "
                        "attention-kernel ms per step in the gpt_train rows")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device")
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else (
        [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32])
    sections = args.only or list(SECTIONS)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report = {"device": device_name(device), "versions": versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": {"quick": args.quick, "sections": sections,
                           "dtypes": [str(d).replace("torch.", "") for d in dtypes]},
              "attention": [], "gpt_train": [], "generate": []}
    out_dir = Path(args.out)
    results_file = None
    if device.type == "cuda" and not args.quick:
        # A grid split over several runs (--only, --dtype) leaves one report per part.
        part = "".join(f"-{x}" for x in (args.only or []) + (args.dtype or []))
        slug = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-").lower()
        results_file = ROOT / "bench" / "results" / f"{slug}-{report['date'][:10]}{part}.json"
    t0 = time.time()
    # The short sections first; the report is written after each, marked complete at the end,
    # so a run cut short still leaves an honest (partial) file.
    profile_dir = out_dir if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    runners = {"gpt_train": lambda *a: bench_gpt_train(*a, profile_dir=profile_dir),
               "generate": bench_generate}
    for section in ("gpt_train", "generate", "attention"):
        if section not in sections:
            continue
        last = section == [s for s in ("gpt_train", "generate", "attention") if s in sections][-1]

        def save(final=False):
            report["seconds"] = round(time.time() - t0, 1)
            report["autotune"] = autotune_report()
            report["complete"] = final
            write_outputs(report, out_dir, log, results_file)
        if section == "attention":
            bench_attention(device, dtypes, args.quick, log, rows=report["attention"], save=save)
        else:
            report[section] = runners[section](device, args.quick, log)
        save(final=last)

    print(f"device: {report['device']}; versions: {report['versions']}; date: {report['date']}")
    print_attention(report["attention"])
    print_rows("gpt_train (full step: forward, backward, AdamW)", report["gpt_train"], "tokens_per_s")
    print_rows("generate (batch 1, one-token prompt)", report["generate"], "tokens_per_s")
    print(f"\nwrote {out_dir}/results.json, results.csv ({report['seconds']} s)"
          + (f" and {results_file}" if results_file else ""))


if __name__ == "__main__":
    main()
