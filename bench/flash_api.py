"""The flash_api section: flash-attn's call, as nanochat makes it, on sliding-window layers.

nanochat calls flash_attn_func(q, k, v, causal=True, window_size=(W, 0)) on (B, T, H, D)
tensors; without FlashAttention-3 (every GPU but Hopper, and CPUs) it falls back to SDPA with an
explicit boolean mask built for each call, which its log calls "significantly slower". These
rows put our flash_attn_interface beside that fallback, forward and forward+backward, on its
shapes.

IMPLS is the registry: name -> factory(device, quick) returning attend(q, k, v, W) on
(B, T, H, D) tensors, or a string saying why it cannot run here. Each is checked against the
oracle (kernels/testing.py's rule) before it is timed.
"""
import torch
import torch.nn.functional as F

from lecture_flash import available_backends
from lecture_flash import flash_attn_interface as fa
from lecture_flash.reference import causal_attention_reference, naive_causal_attention
from lecture_flash.testing import rule_failures

from attention import _geomean, _gqa
from harness import (begin_table, built, print_never_ran, progress, row_groups, pass_fn,
                     time_point, timed_groups, timing_cells)

OURS = ("project-flash-api", "triton-flash-api")


def _sdpa_window_mask(device, quick):
    """nanochat's fallback: (B, H, T, D) views, a (T, T) boolean mask built per call (query i
    sees keys i - W .. i), SDPA with it."""
    def attend(q, k, v, window):
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        T = qh.shape[2]
        row = torch.arange(T, device=q.device).unsqueeze(1)
        col = torch.arange(T, device=q.device).unsqueeze(0)
        mask = (col <= row) & ((row - col) <= window)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, **_gqa(qh, kh))
        return out.transpose(1, 2)
    return attend


def _ours(backend):
    def factory(device, quick):
        if backend == "triton" and ("triton" not in available_backends(device) or device.type != "cuda"):
            return "needs a CUDA GPU and triton"

        def attend(q, k, v, window):
            return fa.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        if backend == "triton":  # the kernels by name, as auto would on CUDA
            from lecture_flash import causal_attention

            def attend(q, k, v, window):  # noqa: F811
                return causal_attention(q, k, v, layout="bthd", window=(window, 0), backend="triton")
        return attend
    return factory


IMPLS = {
    "sdpa-window-mask": _sdpa_window_mask,
    "triton-flash-api": _ours("triton"),
    "project-flash-api": _ours("auto"),
}


def points(device, dtypes, quick):
    """(dtype, B, T, H, Hk, D, W): nanochat's d20 (T 2048, 10 heads of 128, short window 768)
    and a long grouped-query one on a GPU; small ones on a CPU."""
    if device.type == "cuda":
        return [(dt, *shape) for dt in dtypes
                for shape in ((8, 2048, 10, 10, 128, 768), (2, 8192, 16, 4, 128, 2048))]
    if quick:
        return [(dt, 4, 256, 4, 4, 64, 64) for dt in dtypes]
    return [(dt, *shape) for dt in dtypes for shape in ((4, 512, 6, 6, 64, 128),
                                                         (2, 1024, 8, 2, 64, 256))]


def _window_flops(B, T, H, D, window):
    """Forward FLOPs of a causal window: row i sees min(i, W) + 1 keys."""
    keys = sum(min(i, window) + 1 for i in range(T))
    return 4 * B * H * D * keys


def _check(impl, q, k, v, window):
    """None if impl's output obeys the tolerance rule against the oracle, else why."""
    with torch.no_grad():
        out = impl(q, k, v, window)
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        ref = causal_attention_reference(qh.double(), kh.double(), vh.double(), window=(window, 0))
        low = naive_causal_attention(qh, kh, vh, window=(window, 0))
    if out.shape != q.shape:
        return f"wrong: shape {tuple(out.shape)}"
    failures = rule_failures([out.transpose(1, 2)], [ref], [low], names=("out",))
    return f"wrong: {failures[0]}" if failures else None


def run(opts, rows, save):
    device = opts.device
    impls = built(IMPLS, opts)
    grid = getattr(opts, "points", None) or points(device, opts.dtypes, opts.quick)
    bar = progress(len(grid) * len(impls), "flash_api")
    for dtype, B, T, H, Hk, D, window in grid:
        torch.manual_seed(0)
        sets = [[torch.randn(B, T, heads, D, device=device, dtype=dtype, requires_grad=True)
                 for heads in (H, Hk, Hk)] for _ in range(2)]
        plain = [[t.detach() for t in qkv] for qkv in sets]
        do = torch.randn(B, T, H, D, device=device, dtype=dtype)
        base = dict(dtype=str(dtype).replace("torch.", ""), B=B, T=T, H=H, D=D, window=window,
                    **({"Hk": Hk} if Hk != H else {}))
        time_point(impls, base, lambda impl: _check(impl, *plain[0], window),
                   lambda impl, p: pass_fn(impl, p, plain, sets, do, window),
                   _window_flops(B, T, H, D, window), rows,
                   f"flash_api {base['dtype']} T={T} W={window}", bar, device)
        sets = plain = do = None
        save()
    bar.close()


def print_table(rows, opts):
    cuda = opts.device.type == "cuda"
    absent = begin_table(rows, "flash_api (flash_attn_func, causal, sliding window; nanochat's "
                         "call and its SDPA fallback" +
                         ("; TFLOP/s count the window's FLOPs" if cuda else "") + ")")
    if absent is None:
        return
    flops = f" {'TFLOP/s':>8}" if cuda else ""
    print(f"{'dtype':9} {'pass':8} {'B':>3} {'T':>6} {'H':>5} {'D':>4} {'W':>5}  {'impl':18} "
          f"{'ms':>9}{flops} {'vs sdpa-window-mask':>19}  note")
    for rs in row_groups(rows, ("dtype", "pass", "B", "T", "H", "Hk", "D", "window"), absent):
        base = next((r.get("ms") for r in rs if r["impl"] == "sdpa-window-mask"), None)
        for r in rs:
            heads, ms, tf, vs = timing_cells(r, base, cuda)
            print(f"{r['dtype']:9} {r['pass']:8} {r['B']:>3} {r['T']:>6} {heads:>5} {r['D']:>4} "
                  f"{r['window']:>5}  {r['impl']:18} {ms}{tf} {vs:>19}  {r.get('skipped', '')}")
        print()
    print_never_ran(rows)


def verdict(rows, opts):
    """Per pass: flash_attn_func (ours) against nanochat's SDPA fallback, geometric mean."""
    ours = "triton-flash-api" if opts.device.type == "cuda" else "project-flash-api"
    lines = []
    for p in ("fwd", "fwd+bwd"):
        points = timed_groups(rows, p, ("dtype", "B", "T", "H", "Hk", "D", "window"))
        ratios = [ms["sdpa-window-mask"] / ms[ours] for ms in points
                  if ours in ms and "sdpa-window-mask" in ms]
        if ratios:
            lines.append(f"flash_api {p}: {ours} {_geomean(ratios):.2f}x nanochat's SDPA fallback "
                         f"(explicit window mask; geometric mean over {len(ratios)} points; worst "
                         f"{min(ratios):.2f}x)")
    return lines

