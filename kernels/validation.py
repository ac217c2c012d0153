"""Argument checks shared by every backend.

Each check raises a ValueError or TypeError that names the argument and what was expected, so a
user never meets an IndexError from deep inside a kernel. The checks read only shapes, dtypes and
devices (never data), so they are free under torch.compile.
"""
import math

import torch

BACKENDS = ("auto", "triton", "reference", "sdpa")


def check_attention_args(q, k, v, scale, dropout_p):
    """Validate q/k/v/scale/dropout_p; return (q, k, v) as 4-D tensors and whether input was 3-D.
    k and v may have fewer heads than q (grouped-query attention): Hk dividing H, query head h
    reading key/value head h // (H // Hk)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(
                f"{name} must be 4-D (B, H, T, D) or 3-D (N, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(
            f"q, k and v must have the same number of dimensions, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    three_d = q.dim() == 3
    if three_d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    (B, H, Tq, D), (Bk, Hk, Tk, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    if (Bk, Dk) != (B, D):
        what = "batch" if Bk != B else "head dim"
        raise ValueError(f"k must match q in batch and head dim ({what} differs): {shapes}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"k's heads ({Hk}) must divide q's ({H}): each key/value head serves "
                         f"H // Hk query heads (grouped-query attention): {shapes}")
    if Tq == 0 or D == 0:
        raise ValueError(f"q must have at least one query and a non-empty head dim, got {tuple(q.shape)}")
    if Tq > Tk:
        raise ValueError(
            f"q has more positions than k (Tq={Tq} > Tk={Tk}); the causal mask is bottom-right "
            "aligned and needs Tq <= Tk")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        # Scores are computed in float32 (float64 for float64 inputs): a scale past that range
        # makes every score inf, on every backend.
        limit = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).max
        try:
            fits = math.isfinite(scale) and abs(float(scale)) <= limit
        except OverflowError:  # an int too large for any float
            fits = False
        if not fits:
            shown = f"{scale:.4g}" if isinstance(scale, float) else f"an int of {len(str(abs(scale)))} digits"
            raise ValueError(f"scale must be finite and at most {limit:.4g} in magnitude (the "
                             f"range of the scores' float type), got {shown}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return q, k, v, three_d


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def with_positive_scale(q, scale):
    """(q', scale') with scale' > 0 and q' k^T scale' equal to q k^T scale, exactly: (-q, -scale)
    for a negative scale, (q * 0, 1) for zero (q stays in the autograd graph, with a zero
    gradient). Fused kernels that take the row maximum of the unscaled scores need scale > 0;
    PyTorch's own fused SDPA kernels return NaN without it (the CPU one in torch 2.13)."""
    if scale > 0:
        return q, scale
    return (-q, -scale) if scale < 0 else (q * 0.0, 1.0)


def kv_heads_expanded(x, H):
    """(B, Hk, ...) per-key/value-head x repeated to (B, H, ...) along the head axis, so that
    query head h lines up with key/value head h // (H // Hk). A copy: for the PyTorch paths and
    the oracle; the Triton kernel reads each key/value head in place."""
    Hk = x.shape[1]
    return x if Hk == H else x.repeat_interleave(H // Hk, dim=1)


def check_window(window):
    """The window's reach to the left (query i sees keys i + offset - left .. i + offset), or
    None for none; window is None or (left, 0) with an int left >= 0."""
    if window is None:
        return None
    if not (isinstance(window, tuple) and len(window) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in window)):
        raise TypeError(f"window must be None or a tuple (left, 0) of ints, got {window!r}")
    left, right = window
    if left < 0 or right != 0:
        raise ValueError(f"window must be (left, 0) with left >= 0 (a causal window sees no key "
                         f"to the right of its query), got {window!r}")
    return left
