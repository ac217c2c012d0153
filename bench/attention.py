"""The attention section: every implementation, forward and forward+backward, over a grid.

IMPLS is the registry: name -> factory(device, quick) that returns attend(q, k, v) (causal,
(B, H, T, D) in and out), or a string saying why it cannot run here. Adding an implementation
is one entry. Each is checked against the oracle (kernels/testing.py's rule) before it is timed.
"""
import math

import torch
import torch.nn.functional as F

from lecture_flash.gpt.lecture import per_head_attention
from lecture_flash import available_backends, causal_attention
from lecture_flash.reference import naive_causal_attention

from harness import (begin_table, built, check_forward, fmt, print_never_ran, progress, pass_fn,
                     time_point)

LECTURE_SHAPE = dict(B=64, H=6, T=256, D=64)
SLOW_COMPILE = "compiling takes longer than --quick allows on a CPU"


def _sdpa(backend_name, cuda_only=False):
    def factory(device, quick):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if cuda_only and device.type != "cuda":
            return "a CUDA kernel"
        backend = getattr(SDPBackend, backend_name)

        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      **_gqa(q, k))
        return attend
    return factory


def _gqa(q, k):
    """SDPA's and FlexAttention's flag for k, v with fewer heads than q (grouped-query)."""
    return {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}


def _lecture(device, quick):
    def attend(q, k, v):
        if k.shape[1] != q.shape[1]:
            raise ValueError("the lecture's per-head loop has no grouped-query heads")
        return per_head_attention(q, k, v)
    return attend


def flex(device, quick):
    """run(q, k, v, key, mask_mod): FlexAttention compiled once for every length, with the block
    mask of mask_mod() built once per key; or why it cannot run here."""
    if quick and device.type == "cpu":
        return SLOW_COMPILE
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"FlexAttention is not in this torch ({e})"
    compiled = torch.compile(flex_attention, dynamic=True)
    masks = {}

    def run(q, k, v, key, mask_mod):
        if key not in masks:
            if len(masks) >= 16:
                masks.clear()
            masks[key] = create_block_mask(mask_mod(), None, None, q.shape[-2], k.shape[-2],
                                           device=q.device)
        return compiled(q, k, v, block_mask=masks[key], **_gqa(q, k))
    return run


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(device, quick):
    run = flex(device, quick)
    if isinstance(run, str):
        return run
    return lambda q, k, v: run(q, k, v, (q.shape[-2], k.shape[-2], q.device), lambda: _causal)


def _compiled_naive(device, quick):
    if quick and device.type == "cpu":
        return SLOW_COMPILE
    return torch.compile(naive_causal_attention, dynamic=True)


def _ours(**options):
    def factory(device, quick):
        if "triton" not in available_backends(device) or device.type != "cuda":
            return "needs a CUDA GPU and triton"
        return lambda q, k, v: causal_attention(q, k, v, backend="triton", **options)
    return factory


IMPLS = {
    "lecture": _lecture,
    "naive-batched": lambda device, quick: naive_causal_attention,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION", cuda_only=True),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION", cuda_only=True),
    "sdpa-math": _sdpa("MATH"),
    "flex": _flex,
    "compiled-naive": _compiled_naive,
    "triton": _ours(),
    # The non-deterministic backward: dQ added atomically by the dK/dV kernel.
    "triton-atomic-dq": _ours(deterministic=False),
    "project-auto": lambda device, quick: lambda q, k, v: causal_attention(q, k, v),
}


def grid(device, dtypes, quick):
    """(dtype, B, H, T, D, Hk) points (Hk: key/value heads, < H for grouped-query ones). B*H
    shrinks as T grows so each call does similar work."""
    if device.type == "cuda":
        Ts = (256, 1024, 4096) if quick else (256, 512, 1024, 2048, 4096, 8192, 16384)
        Ds, tokens, width = (64, 128), 16384, 2048
    else:
        Ts = (128, 256) if quick else (128, 256, 512, 1024)
        Ds, tokens, width = (64,), 1024 if quick else 2048, 384
    points = [(dt, max(1, tokens // T), width // D, T, D, width // D)
              for dt in dtypes for D in Ds for T in Ts]
    if not quick:
        s = LECTURE_SHAPE
        points += [(dt, s["B"], s["H"], s["T"], s["D"], s["H"]) for dt in dtypes]
    if device.type == "cuda":  # grouped-query heads as current open models have them
        points += [(dt, tokens // T, 32, T, 128, 8) for dt in dtypes for T in (1024, 4096)]
    return points


def run(opts, rows, save):
    """Time every implementation over the grid, appending to `rows`; save() after each grid
    point, so that a run cut short keeps what it measured."""
    device = opts.device
    impls = built(IMPLS, opts)
    points = getattr(opts, "points", None) or grid(device, opts.dtypes, opts.quick)
    bar = progress(len(points) * len(impls), "attention")
    for dtype, B, H, T, D, Hk in points:
        torch.manual_seed(0)
        sets = [[torch.randn(B, heads, T, D, device=device, dtype=dtype, requires_grad=True)
                 for heads in (H, Hk, Hk)] for _ in range(2)]
        plain = [[t.detach() for t in qkv] for qkv in sets]  # forward-only: some refuse grads
        do = torch.randn(B, H, T, D, device=device, dtype=dtype)
        flops = 4 * B * H * T * T * D / 2  # causal: half of the two (T x T x D) matmuls
        base = dict(dtype=str(dtype).replace("torch.", ""), B=B, H=H, T=T, D=D,
                    **({"Hk": Hk} if Hk != H else {}))
        time_point(impls, base, lambda impl: check_forward(impl, *plain[0]),
                   lambda impl, p: pass_fn(impl, p, plain, sets, do), flops, rows,
                   f"attention {base['dtype']} B={B} H={H}{f'/{Hk}' if Hk != H else ''} T={T} "
                   f"D={D}", bar, device)
        sets = plain = do = None  # freed before the next point's inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    bar.close()


def _ours(device_type):
    """The row that stands for this project: the kernel itself on a GPU, what auto picks elsewhere."""
    return "triton" if device_type == "cuda" else "project-auto"


def print_table(rows, opts):
    cuda = opts.device.type == "cuda"
    absent = begin_table(rows, "attention (causal" + ("; TFLOP/s count 4*B*H*T*T*D/2 forward, "
                                                      "2.5x that for fwd+bwd" if cuda else "") + ")")
    if absent is None:
        return
    groups = {}
    for r in rows:
        if r["impl"] not in absent:
            groups.setdefault((r["dtype"], r["D"], r["pass"], r["B"], r["H"], r.get("Hk"), r["T"]),
                              []).append(r)
    flops = f" {'TFLOP/s':>8}" if cuda else ""
    print(f"{'dtype':9} {'pass':8} {'B':>4} {'H':>5} {'T':>6} {'D':>4}  {'impl':16} {'ms':>9}{flops} "
          f"{'vs lecture':>10} {'vs best sdpa':>12}  note")
    for rs in groups.values():
        lecture = next((r.get("ms") for r in rs if r["impl"] == "lecture"), None)
        sdpa = [r["ms"] for r in rs if r["impl"].startswith("sdpa-") and "ms" in r]
        best = min(sdpa) if sdpa else None
        for r in rs:
            ms = r.get("ms")
            vl = f"{lecture / ms:.2f}x" if ms and lecture else "-"
            vs = f"{best / ms:.2f}x" if ms and best else "-"
            tf = f" {fmt(r.get('tflops'), '8.1f')}" if cuda else ""
            heads = f"{r['H']}/{r['Hk']}" if "Hk" in r else str(r["H"])  # query/key-value heads
            print(f"{r['dtype']:9} {r['pass']:8} {r['B']:>4} {heads:>5} {r['T']:>6} {r['D']:>4}  "
                  f"{r['impl']:16} {fmt(ms, '9.3f')}{tf} {vl:>10} {vs:>12}  {r.get('skipped', '')}")
        print()
    print_never_ran(rows)


def verdict(rows, opts):
    """Per pass: ours against the lecture and the fastest SDPA backend, as the geometric mean
    over the grid's shapes (and at the lecture's shape, where it was run)."""
    ours, lines = _ours(opts.device.type), []
    for p in ("fwd", "fwd+bwd"):
        groups = {}
        for r in rows:
            if r["pass"] == p and "ms" in r:
                groups.setdefault((r["dtype"], r["B"], r["H"], r.get("Hk"), r["T"], r["D"]),
                                  {})[r["impl"]] = r["ms"]
        vs_lecture, vs_sdpa = [], []
        for ms in groups.values():
            sdpa = [v for k, v in ms.items() if k.startswith("sdpa-")]
            if ours in ms and "lecture" in ms:
                vs_lecture.append(ms["lecture"] / ms[ours])
            if ours in ms and sdpa:
                vs_sdpa.append(min(sdpa) / ms[ours])
        if vs_sdpa:  # (the lecture's loop where it ran: evidence.py leaves it out)
            lecture = f"{_geomean(vs_lecture):.2f}x the lecture, " if vs_lecture else ""
            lines.append(f"attention {p}: {ours} {lecture}{_geomean(vs_sdpa):.2f}x the fastest "
                         f"SDPA backend (geometric mean over {len(vs_sdpa)} shapes; worst "
                         f"{min(vs_sdpa):.2f}x)")
        auto = [min(v for k, v in ms.items() if k.startswith("sdpa-")) / ms["project-auto"]
                for ms in groups.values()
                if "project-auto" in ms and any(k.startswith("sdpa-") for k in ms)]
        if ours != "project-auto" and auto:  # auto's promise: never far behind SDPA
            lines.append(f"attention {p}: project-auto worst {min(auto):.2f}x the fastest SDPA "
                         f"backend over {len(auto)} shapes (geometric mean {_geomean(auto):.2f}x)")
    return lines


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def plot(report, path):
    """TFLOP/s against T, one panel per (D, pass), every implementation a line (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = LECTURE_SHAPE
    rows = [r for r in report["attention"] if "tflops" in r
            and (r["B"], r["H"], r["T"]) != (s["B"], s["H"], s["T"]) and "Hk" not in r]  # the grid's lines
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
