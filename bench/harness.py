"""What every benchmark section shares: timing, the oracle check, the report and its files.

Timing: CUDA through triton.testing.do_bench (median, p20, p80; it flushes L2 between runs);
CPU through time.perf_counter, repeated, median. A section's rows are plain dicts; the report
is one dict (device, versions, date, settings, a list of rows per section), written as JSON and
as long-format CSV (one row per measurement, as Liger-Kernel's benchmarks write them).
"""
import csv
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

try:
    from lecture_flash.reference import causal_attention_reference, naive_causal_attention
    from lecture_flash.testing import rule_failures
except ModuleNotFoundError as e:  # the benchmarks time the installed package, never the root's
    if e.name != "lecture_flash":
        raise
    sys.exit("lecture_flash is not installed in this Python: from the repository root, run\n"
             "  pip install -e .                                  # with network access\n"
             "  pip install --no-deps --no-build-isolation -e .   # offline (a GPU image)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, min_time=0.5, max_reps=50, min_reps=3):
    """(median, p20, p80) wall-clock milliseconds of fn(), synchronising the device around each
    call, after one warm-up call: at least min_reps calls, then more until min_time seconds or
    max_reps calls."""
    fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return median_p20_p80(times)


def median_p20_p80(times):
    """(median, 20th, 80th percentile) of a list of timings."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


# A timing whose middle repeats (20th to 80th percentile) span more than this fraction of its
# median was taken while the machine did something else: its ratios to other rows mean little.
NOISY_SPREAD = 0.25


def untrusted(report, sections):
    """Lines naming the timings not to trust, each marked in its row ("noisy": why): a spread
    past NOISY_SPREAD, or a forward slower than the same implementation's forward+backward at
    the same point (which only a busy machine produces)."""
    lines = []
    for section in sections:
        rows = report[section]
        for r in rows:
            ms = r.get("ms", r.get("ms_per_iter"))
            if ms and r.get("ms_p20") is not None and (r["ms_p80"] - r["ms_p20"]) > NOISY_SPREAD * ms:
                r["noisy"] = (f"repeats spread from {r['ms_p20']:.3g} to {r['ms_p80']:.3g} ms "
                              f"(20th-80th percentile) around {ms:.3g}")
        both = {}
        for r in rows:
            if r.get("pass") in ("fwd", "fwd+bwd") and r.get("ms"):
                key = tuple(sorted((k, str(v)) for k, v in r.items() if k in KEY_FIELDS + ("impl",)
                                   and k != "pass"))
                both.setdefault(key, {})[r["pass"]] = r
        for pair in both.values():
            if len(pair) == 2 and pair["fwd"]["ms"] > pair["fwd+bwd"]["ms"]:
                pair["fwd"]["noisy"] = (f"forward {pair['fwd']['ms']:.3g} ms, slower than its "
                                        f"forward+backward {pair['fwd+bwd']['ms']:.3g} ms")
        for r in rows:
            if "noisy" in r:
                where = " ".join(f"{k}={r[k]}" for k in KEY_FIELDS if k in r)
                lines.append(f"  {section} {r['impl']} {where}: {r['noisy']}")
    return lines


def measure(fn, device):
    """(median, p20, p80) milliseconds of fn(): do_bench on CUDA, wall_ms elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=25, rep=60, quantiles=[0.5, 0.2, 0.8]))
    return wall_ms(fn, device)


def peak_memory_mb(fn, device):
    """Peak CUDA memory fn() allocates beyond what was allocated before it (None on CPU)."""
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


def check_forward(impl, q, k, v):
    """None if impl's output on the first head obeys the tests' tolerance rule, else why."""
    with torch.no_grad():
        out = impl(q, k, v)[:1, :1]
        qs, ks, vs = q[:1, :1], k[:1, :1], v[:1, :1]
        ref = causal_attention_reference(qs.double(), ks.double(), vs.double())
        low = naive_causal_attention(qs, ks, vs)
    failures = rule_failures([out], [ref], [low], names=("out",))
    return f"wrong: {failures[0]}" if failures else None


def skipped_reason(e):
    """One line for a row that could not be measured."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text.split('. ')[0][:160]}"


def versions():
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": tv,
            "cuda": torch.version.cuda}


def commit(root):
    """The checkout's commit (short hash, "+changes" if the working tree differs from it), or
    None outside a git checkout."""
    import subprocess
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def progress(total, desc):
    """A progress bar on stderr (tqdm), for a section's runs."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="run", leave=False, dynamic_ncols=True,
                file=sys.stderr)


def log(msg):
    """A line on stderr that does not break a progress bar."""
    from tqdm.auto import tqdm
    tqdm.write(msg, file=sys.stderr)


def never_ran(rows):
    """impl -> why, for the implementations none of whose rows ran (not on this device, or not
    in this kind of run): said once, not on every line."""
    by_impl = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    return {impl: rs[0]["skipped"] for impl, rs in by_impl.items()
            if all("skipped" in r for r in rs)}


def begin_table(rows, title):
    """Print a section table's title: the implementations none of whose rows ran (said once,
    under the table: print_never_ran), or None where there are no rows (no table)."""
    if not rows:
        return None
    print(f"\n== {title} ==")
    return never_ran(rows)


def built(impls, opts):
    """A section's registry built for this run: name -> factory(device, quick)'s result, for
    every name or, where opts.impls names some (evidence.py), those. (opts.points, where a
    section reads it, is likewise a grid of the caller's.)"""
    names = getattr(opts, "impls", None) or impls
    return {name: factory(opts.device, opts.quick) for name, factory in impls.items()
            if name in names}


def row_groups(rows, fields, absent=()):
    """The rows grouped by their values of `fields` (a missing field reads None), in the order
    first seen, leaving out the implementations in `absent`: one table block per group."""
    groups = {}
    for r in rows:
        if r["impl"] not in absent:
            groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return list(groups.values())


def timing_cells(r, base, cuda):
    """(heads, ms, TFLOP/s, "vs base") of a row as a table prints them: heads "H" or "H/Hk";
    TFLOP/s only on CUDA (else ""); the ratio base / ms, or "-" where either is missing."""
    ms = r.get("ms")
    heads = f"{r['H']}/{r['Hk']}" if "Hk" in r else str(r["H"])
    tf = f" {fmt(r.get('tflops'), '8.1f')}" if cuda else ""
    return heads, fmt(ms, "9.3f"), tf, (f"{base / ms:.2f}x" if ms and base else "-")


def timed_groups(rows, p, fields):
    """[{impl: ms}] of pass p's timed rows, one dict per point (its values of `fields`)."""
    timed = [r for r in rows if r["pass"] == p and "ms" in r]
    return [{r["impl"]: r["ms"] for r in rs} for rs in row_groups(timed, fields)]


def print_never_ran(rows):
    why = {}
    for impl, reason in never_ran(rows).items():
        why.setdefault(reason, []).append(impl)
    for reason, impls in why.items():
        print(f"not run here: {', '.join(impls)} ({reason})")


def print_rows(title, rows, metric, baseline="lecture", alternative=None):
    """One line per row, grouped by dtype: the metric, and its ratio to the baseline's and to
    the alternative's; MFU where it was measured (a GPU)."""
    if not rows:
        return
    print(f"\n== {title} ==")
    absent = never_ran(rows)
    for key in sorted({r.get("dtype", "") for r in rows}):
        rs = [r for r in rows if r.get("dtype", "") == key and r["impl"] not in absent]
        base = next((r.get(metric) for r in rs if r["impl"] == baseline), None)
        alt = next((r.get(metric) for r in rs if r["impl"] == alternative), None)
        for r in rs:
            v = r.get(metric)
            extra = f" mfu {100 * r['mfu']:5.1f}%" if r.get("mfu") else ""
            ratio = f"{v / base:6.2f}x {baseline}" if v and base else ""
            ratio += f" {v / alt:6.2f}x {alternative}" if v and alt and r["impl"] != alternative else ""
            print(f"{key:9} {r['impl']:24} {fmt(v, '14,.1f')} {metric}{extra} {ratio} "
                  f"{r.get('skipped', '')}")
    print_never_ran(rows)


def ratio_line(what, rows, metric, impl, against):
    """'what: impl 1.71x lecture, 1.16x sdpa-batched' from rows (one per impl), or None."""
    value = {r["impl"]: r.get(metric) for r in rows}
    if not value.get(impl):
        return None
    parts = [f"{value[impl] / value[a]:.2f}x {a}" for a in against if value.get(a)]
    return f"{what}: {impl} " + ", ".join(parts) if parts else None


# The row fields that say which measurement a CSV line is; the others are metrics.
KEY_FIELDS = ("pass", "dtype", "B", "H", "T", "D", "new_tokens")


def write_report(report, sections, paths):
    """The report as JSON at each of `paths` (the first a folder: it also gets results.csv,
    one line per metric of every row)."""
    out_dir, *others = paths
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    (out_dir / "results.json").write_text(text)
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "impl", "key", "metric", "value", "device", "torch", "date"])
        for section in sections:
            for r in report[section]:
                key = ";".join(f"{k}={r[k]}" for k in KEY_FIELDS if k in r)
                for metric, value in r.items():
                    if metric == "impl" or metric in KEY_FIELDS or value is None:
                        continue
                    w.writerow([section, r["impl"], key, metric, value, report["device"],
                                report["versions"]["torch"], report["date"]])


def timed_calls(fns, device, inner=1, min_time=0.5, max_reps=50, min_reps=5, wall=False):
    """name -> (median, p20, p80) milliseconds per call of each fn(), or a string saying why it
    could not run. Each is called once first (a warm-up, and whether it runs at all). On CUDA
    each is then measured on its own (do_bench: the GPU's time); on a CPU, or with wall (the
    host's time per call, bench/host_overhead.py), round-robin: `inner` calls back to back per
    timing and one synchronisation after them, one timing of each per round (at least min_reps
    rounds, then more until min_time seconds per fn or max_reps rounds), so that a busy moment
    of the machine hits every implementation alike instead of whichever was being timed then."""
    found, live = {}, {}
    for name, fn in fns.items():
        try:
            fn()
            sync(device)
            live[name] = fn
        except Exception as e:  # cannot run here (no kernel for this dtype/device, OOM...)
            found[name] = skipped_reason(e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda" and not wall:
        for name, fn in live.items():
            try:
                found[name] = measure(fn, device)
            except Exception as e:
                found[name] = skipped_reason(e)
                torch.cuda.empty_cache()
        return found
    times = {name: [] for name in live}
    start, rounds = time.perf_counter(), 0
    while live and (rounds < min_reps or (time.perf_counter() - start < min_time * len(live)
                                          and rounds < max_reps)):
        for name, fn in live.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3 / inner)
        rounds += 1
    found.update({name: median_p20_p80(t) for name, t in times.items()})
    return found


def time_point(impls, base, check, make_pass, flops, rows, label, bar, device):
    """Check then time each implementation at one grid point, forward and forward+backward
    (timed_calls: on a CPU round-robin over every implementation and pass), appending a row per
    pass to `rows` (base: the point's fields; check(impl) -> None or why it is skipped;
    make_pass(impl, p) -> the pass as a callable (pass_fn); flops: of the forward)."""
    fns, found = {}, {}
    for name, impl in impls.items():
        why = impl if isinstance(impl, str) else None
        if why is None:
            try:
                why = check(impl)
            except Exception as e:  # cannot run here (no kernel for this dtype/device, OOM...)
                why = f"skipped: {skipped_reason(e)}"
        for p in ("fwd", "fwd+bwd"):
            row = found[(name, p)] = dict(impl=name, **{"pass": p}, **base)
            rows.append(row)
            if why:
                row["skipped"] = why
            else:
                fns[(name, p)] = make_pass(impl, p)
    for key, got in timed_calls(fns, device).items():
        row = found[key]
        if isinstance(got, str):
            row["skipped"] = got
            continue
        ms, p20, p80 = got
        fl = flops * (2.5 if key[1] == "fwd+bwd" else 1.0)
        row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=fl / ms / 1e9,
                   peak_mem_mb=peak_memory_mb(fns[key], device))
    for name, impl in impls.items():
        if not isinstance(impl, str):
            log(f"  {label} {name}: " + ", ".join(
                f"{p} {found[(name, p)]['ms']:.3f} ms" if "ms" in found[(name, p)]
                else f"{p} {found[(name, p)]['skipped']}" for p in ("fwd", "fwd+bwd")))
        bar.update(1)


def pass_fn(impl, p, plain, sets, do, *extra):
    """One pass of impl(q, k, v, *extra) as a callable, the inputs rotating between two copies
    (plain: detached, for the forward; sets: requiring grads)."""
    cycle = itertools.cycle(plain if p == "fwd" else sets)
    if p == "fwd":
        def fn():
            with torch.no_grad():
                impl(*next(cycle), *extra)
    else:
        def fn():
            qkv = next(cycle)
            impl(*qkv, *extra).backward(do)
            for t in qkv:
                t.grad = None
    return fn
