"""Argument checks shared by every backend.

Each check raises a ValueError or TypeError that names the argument and what was expected, so a
user never meets an IndexError from deep inside a kernel. The checks read only shapes, dtypes and
devices (never data), so they are free under torch.compile.
"""
import math

import torch

BACKENDS = ("auto", "triton", "reference", "sdpa")


def check_attention_args(q, k, v, scale, dropout_p, full=False):
    """Validate q/k/v/scale/dropout_p; return (q, k, v) as 4-D tensors and whether input was 3-D.
    k and v may have fewer heads than q (grouped-query attention): Hk dividing H, query head h
    reading key/value head h // (H // Hk). full: the mask is full attention (no causal side, no
    window), where q may have more positions than k."""
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
    if Tq > Tk and not full:
        raise ValueError(
            f"q has more positions than k (Tq={Tq} > Tk={Tk}); the causal mask is bottom-right "
            "aligned and needs Tq <= Tk (full attention, causal=False without a window, takes any)")
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


def check_window(window, causal=True):
    """(left, right) of the mask: query i (at position i + offset among the keys) sees keys
    i + offset - left .. i + offset + right, None being no bound on that side. window is None or
    flash-attn's (left, right) of ints, -1 for no bound; causal=True takes right 0 (a causal
    window sees no key to the right of its query), causal=False with no window is full
    attention, (None, None)."""
    if window is None:
        return (None, 0) if causal else (None, None)
    if not (isinstance(window, tuple) and len(window) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in window)):
        raise TypeError(f"window must be None or a tuple (left, right) of ints, got {window!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window must be (left, right) with each >= 0, or -1 for no bound on "
                         f"that side, got {window!r}")
    if causal and right != 0:
        raise ValueError(f"window {window!r} with causal=True: a causal window sees no key to "
                         "the right of its query, so right must be 0; pass causal=False for a "
                         "window with a right side (flash-attn's local attention)")
    return (None if left == -1 else left), (None if right == -1 else right)


def check_softcap(softcap):
    """softcap as a float: 0 for none, else > 0 (scores become softcap * tanh(score / softcap))."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0 for none), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be 0.0 (none) or a positive finite float, got {softcap}")
    return float(softcap)


def check_sinks(sinks, H, device):
    """sinks: None, or an (H,) floating-point tensor on q's device, one logit per query head."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be None or a torch.Tensor, got {type(sinks).__name__}")
    if not sinks.is_floating_point() or tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be a floating-point ({H},) tensor, one logit per query "
                         f"head, got {sinks.dtype} of shape {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks must be on q's device {device}, got {sinks.device}")
    return sinks


def _check_index_tensor(name, t, shape, device):
    """t must be an integer tensor of this shape on this device; returned as contiguous int32
    (the kernels read it by index)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t.to(torch.int32).contiguous()


def check_seqlens_k(seqlens_k, q4, k4):
    """seqlens_k as int32 (B,), for 4-D q4, k4: keys past a row's length are unseen. Values
    outside [0, Tk] are clamped (checked here only where that needs no device sync: on CPU)."""
    B, Tk = q4.shape[0], k4.shape[2]
    lengths = _check_index_tensor("seqlens_k", seqlens_k, (B,), q4.device)
    return check_length_values("seqlens_k", lengths, f"Tk={Tk}", Tk)


def check_length_values(name, lengths, what, limit):
    """lengths (a 1-D integer tensor), after checking its values lie in [0, limit] where that
    needs no device sync (on CPU, not while torch.compile traces); on a GPU the kernels clamp
    them instead."""
    return length_range(name, lengths, what, limit)[0]


def length_range(name, lengths, what, limit):
    """(lengths, their smallest value, their largest) after check_length_values' check; the
    smallest and largest are None where they are not read (a GPU, tracing)."""
    if lengths.device.type == "cpu" and lengths.numel() and not torch.compiler.is_compiling():
        if lengths.numel() <= 64:  # a decode batch: one conversion, no reduction ops
            values = lengths.tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = (int(x) for x in torch.aminmax(lengths))
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} must lie in [0, {what}], got values from {lo} to {hi}")
        return lengths, lo, hi
    return lengths, None, None


def check_packed_args(q, k, v, scale, dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k):
    """Packed sequences, flash-attn's varlen convention: q (total_q, H, D), k and v (total_k,
    Hk, D), cu_seqlens_* (B + 1,) cumulative lengths from 0 to total. Returns (cu_q, cu_k as
    int32, max_seqlen_q, max_seqlen_k); a max length left None is read from cu_seqlens (one
    device sync), and then the offsets are checked too."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("packed sequences need both cu_seqlens_q and cu_seqlens_k")
    key = None
    if not torch.compiler.is_compiling():
        try:  # everything the checks read, the offsets' tensors by identity and version
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
                   v.device, type(scale), scale, type(dropout_p), dropout_p,
                   id(cu_seqlens_q), cu_seqlens_q._version, id(cu_seqlens_k),
                   cu_seqlens_k._version, max_seqlen_q, max_seqlen_k)
            kept = _CHECKED_OFFSETS.get(key)
        except (AttributeError, TypeError):  # not tensors, or an unhashable argument
            key = kept = None
        if kept is not None and kept[0] is cu_seqlens_q and kept[1] is cu_seqlens_k:
            return kept[2]  # the same call on the same tensors, unchanged since
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"with cu_seqlens, {name} must be 3-D (total, heads, D) (packed "
                             f"sequences), got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} holds no packed rows (shape {tuple(t.shape)})")
    # The dense checks (dtypes, devices, heads, head dims, scale, p) on one row of each, seen
    # as (1, heads, 1, D).
    check_attention_args(*(t[:1].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), scale,
                         dropout_p)
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        shape = tuple(cu_seqlens_q.shape) if isinstance(cu_seqlens_q, torch.Tensor) else type(cu_seqlens_q).__name__
        raise ValueError(f"cu_seqlens_q must be a (B + 1,) tensor with B >= 1, got {shape}")
    n = cu_seqlens_q.shape[0]
    cu_q = _check_index_tensor("cu_seqlens_q", cu_seqlens_q, (n,), q.device)
    cu_k = _check_index_tensor("cu_seqlens_k", cu_seqlens_k, (n,), q.device)
    lengths = []
    for name, cu, total, given in (("q", cu_q, q.shape[0], max_seqlen_q),
                                   ("k", cu_k, k.shape[0], max_seqlen_k)):
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int) or given < 0:
                raise TypeError(f"max_seqlen_{name} must be a non-negative int or None, got {given!r}")
        if given is None or (cu.device.type == "cpu" and not torch.compiler.is_compiling()):
            steps = cu[1:] - cu[:-1]
            first, last, shortest = int(cu[0]), int(cu[-1]), int(steps.min())
            longest = int(steps.max())
            if first != 0 or last != total or shortest < 0:
                raise ValueError(f"cu_seqlens_{name} must rise from 0 to the number of packed "
                                 f"rows ({total}), got {first} .. {last} (smallest step "
                                 f"{shortest})")
            if given is not None and given < longest:
                raise ValueError(f"max_seqlen_{name}={given} is less than the longest sequence "
                                 f"({longest})")
            given = longest if given is None else given
        lengths.append(given)
    checked = cu_q, cu_k, lengths[0], lengths[1]
    if key is not None:  # a model's layers pass the same cu_seqlens tensors
        if len(_CHECKED_OFFSETS) >= 16:
            _CHECKED_OFFSETS.pop(next(iter(_CHECKED_OFFSETS)))
        _CHECKED_OFFSETS[key] = (cu_seqlens_q, cu_seqlens_k, checked)
    return checked


# (what check_packed_args reads: shapes, dtypes, devices, scale, p, the ids and versions of
# cu_seqlens, max lengths) -> (the tensors, the checked offsets and lengths): packed calls
# repeat them layer after layer; torch's version counter says whether one was written to.
_CHECKED_OFFSETS = {}
