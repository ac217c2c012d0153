"""causal_attention and decode_attention: each call checked once, then sent down one route.

Backends: "triton" (the fused FlashAttention-2-style kernel, CUDA; kernels/flash.py), "sdpa"
(PyTorch's scaled_dot_product_attention), "reference" (the explicit-softmax oracle), and "auto"
(on CUDA the fastest of Triton and SDPA's backends per class of calls, measured once:
kernels/auto.py). The PyTorch routes keep masked positions out of their outputs
(kernels/masking.py) and take per-row key lengths and packed sequences as masks
(kernels/packing.py).
"""
import functools

import torch
import torch.nn.functional as F

from . import auto, devices, settings
from .masking import guarded_attention_with_mask, guarded_causal, guarded_masked
from .packing import block_diagonal_mask, pad, unpad, unpad_rows
from .reference import (attention_with_mask, causal_attention_reference, causal_mask,
                        key_length_mask, masked_lse, masked_scores, packed_mask)
from .validation import (check_attention_args, check_backend, length_range,
                         check_packed_args, check_seqlens_k, check_sinks, check_softcap,
                         check_window, kv_heads_expanded, with_positive_scale)

try:
    from . import flash
except ImportError as e:  # no triton on this platform (macOS, Windows): pure-PyTorch only
    flash = None
    _FLASH_IMPORT_ERROR = str(e)

# PyTorch's own SDPA, kept as it was at import: a user may monkey-patch
# F.scaled_dot_product_attention with ours (scaled_dot_product_attention below), and the paths
# that hand work to PyTorch must not then call back into it.
_torch_sdpa = F.scaled_dot_product_attention


def _triton_unavailable(q):
    """Why backend="triton" cannot run q, or None if it can."""
    if flash is None:
        return f"triton is not installed ({_FLASH_IMPORT_ERROR})"
    return flash.supports(q)


def default_device(device=None):
    """torch.device(device), or when it is None the default: CUDA if present, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class Backends(list):
    """available_backends()' list of names, which also says where it looked: `platform`
    ("cuda", "rocm" or "cpu") and `device` (the GPU's name and arch, e.g. "NVIDIA A10 (sm_86)",
    or the device type)."""

    def __init__(self, names, platform, device):
        super().__init__(names)
        self.platform, self.device = platform, device

    def __repr__(self):
        return f"Backends({list(self)!r}, platform={self.platform!r}, device={self.device!r})"


def available_backends(device=None):
    """The backends that can run on `device` (default: CUDA if present, else CPU), best first,
    as a list that also names the platform found (Backends)."""
    device = default_device(device)
    names = ["sdpa", "reference"]
    if flash is not None and not flash.TOO_OLD and (device.type == "cuda" or flash.INTERPRET):
        names.insert(0, "triton")
    platform, where = device.type, device.type
    if device.type == "cuda" and torch.cuda.is_available():
        platform, where = devices.platform(), devices.target_of(device).describe()
    return Backends(names, platform, where)


def _overlaps(t):
    """Whether two elements of t may share memory (strides such as stride_t = stride_d = 1).
    A review saw PyTorch's CPU SDPA return garbage for such inputs; the shapes tried here with
    torch 2.13 came out right, and a copy costs little, so the sdpa backend copies them."""
    if t.is_contiguous():
        return False
    # (torch.compile traces the function itself: it warns about a cache it would skip)
    test = _overlapping.__wrapped__ if torch.compiler.is_compiling() else _overlapping
    return test(tuple(t.shape), t.stride())


@functools.lru_cache(maxsize=4096)  # a model asks about a few layouts, once per call (~5 us)
def _overlapping(shape, strides):
    dims = sorted((st, n) for st, n in zip(strides, shape) if n > 1)
    reach = 0  # the largest offset the smaller-stride dimensions span
    for stride, n in dims:
        if stride <= reach:
            return True
        reach += stride * (n - 1)
    return False


def _sdpa(q, k, v, scale, dropout_p, pinned=None, left=None, mask=None, right=0):
    """PyTorch's SDPA with our mask convention; pinned: the name of the one SDPBackend to use;
    left, right: a window's reach on either side of the diagonal (packing.visible; passed as a
    boolean mask, and none at all for full attention); mask: a boolean mask to use instead
    (True where a query sees a key)."""
    if pinned is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, pinned)]):
            return _sdpa(q, k, v, scale, dropout_p, left=left, mask=mask, right=right)
    Tq, Tk = q.shape[-2], k.shape[-2]
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        q, k, v = (t.contiguous() if not t.is_contiguous() and _overlaps(t) else t
                   for t in (q, k, v))
    q, scale = with_positive_scale(q, scale)  # SDPA's fused kernels give NaN for scale <= 0
    # Grouped-query heads (k, v with fewer heads than q): SDPA's enable_gqa reads them in place.
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if mask is not None:
        return _torch_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, **gqa)
    if left is None and right is None:  # full attention
        return _torch_sdpa(q, k, v, dropout_p=dropout_p, scale=scale, **gqa)
    if right != 0:
        return _torch_sdpa(q, k, v, attn_mask=_window_mask(Tq, Tk, q.device, left, right),
                           dropout_p=dropout_p, scale=scale, **gqa)
    if left is None and Tq == Tk:
        return _torch_sdpa(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, **gqa)
    if left is None and Tq == 1:  # one new query sees every key: no mask at all
        return _torch_sdpa(q, k, v, dropout_p=dropout_p, scale=scale, **gqa)
    # SDPA's is_causal aligns top-left when Tq != Tk, ours bottom-right; and it has no windows.
    return _torch_sdpa(q, k, v, attn_mask=_window_mask(Tq, Tk, q.device, left),
                       dropout_p=dropout_p, scale=scale, **gqa)


_WINDOW_MASKS = {}  # (Tq, Tk, device, left, right) -> the bool mask, for the SDPA paths


def _window_mask(Tq, Tk, device, left=None, right=0):
    """causal_mask(Tq, Tk, device, left, right), kept for the shapes a model repeats (every layer
    and step of a run asks for the same few): building it is several elementwise passes over
    (Tq, Tk) per call otherwise. Not kept while compiling (the graph holds it)."""
    if torch.compiler.is_compiling():
        return causal_mask(Tq, Tk, device, left, right)
    key = (Tq, Tk, device, left, right)
    mask = _WINDOW_MASKS.get(key)
    if mask is None:
        if len(_WINDOW_MASKS) >= 32:  # e.g. a decode loop whose Tk grows: keep it bounded
            _WINDOW_MASKS.pop(next(iter(_WINDOW_MASKS)))
        mask = _WINDOW_MASKS[key] = causal_mask(Tq, Tk, device, left, right)
    return mask


_POSITIONS = {}  # (S, device) -> arange(S): a decode step's key positions, kept


def _positions(S, device):
    if torch.compiler.is_compiling():
        return torch.arange(S, device=device)
    found = _POSITIONS.get((S, device))
    if found is None:
        if len(_POSITIONS) >= 16:
            _POSITIONS.clear()
        found = _POSITIONS[(S, device)] = torch.arange(S, device=device)
    return found


def _auto_backend(q, measure):
    if q.device.type == "cuda" and _triton_unavailable(q) is None and flash.declines(q) is None:
        # measure: the call leaves the options to the process defaults; then the fastest path
        # for this class of calls is measured (kernels/auto.py), else it is Triton.
        return "measure" if measure and auto.MEASURE else "triton"
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # PyTorch's CPU SDPA kernel loses precision in the bf16 backward (dV error up to 2.3x
        # that of plain bf16 math, see tests/test_backends.py); the float32 path is exact enough.
        return "reference"
    return "sdpa"


# Argument checks and the backend choice depend only on the arguments' shapes, dtypes, devices,
# types and values: a call whose signature was seen before skips them (a training run repeats
# one signature thousands of times; the checks cost about 9 us of its host time on a 2-core CPU).
_RESOLVED = {}


def _resolve(q, k, v, scale, dropout_p, backend, deterministic, fp32_precision, return_lse, window,
             lengths=False, causal=True, softcap=0.0, sinks=None):
    """(backend to run, scale, whether the inputs are 3-D, the mask's (left, right) reach,
    softcap), or the error for bad arguments. lengths: whether the call gives per-row key
    lengths."""
    check_backend(backend)
    settings.check(deterministic, fp32_precision)
    left, right = check_window(window, causal)
    q4, _, _, three_d = check_attention_args(q, k, v, scale, dropout_p,
                                             full=left is None and right is None)
    softcap = check_softcap(softcap)
    check_sinks(sinks, q4.shape[1], q4.device)
    scale = q4.shape[-1] ** -0.5 if scale is None else float(scale)
    plain = left is None and right == 0 and not softcap and sinks is None
    return (_backend_for(q4, backend, deterministic is None and fp32_precision is None
                         and not return_lse and plain and not lengths),
            scale, three_d, (left, right), softcap)


def _backend_for(q, backend, measure):
    """The backend a call runs: "auto" picks "triton" only where it can run (measure: the call
    leaves every option to the defaults, see _auto_backend); "triton" is checked."""
    if backend == "auto":
        return _auto_backend(q, measure)
    if backend == "triton":
        why = _triton_unavailable(q)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run here: {why}")
    return backend


def causal_attention(q, k, v, *, scale=None, dropout_p=0.0, backend="auto", deterministic=None,
                     fp32_precision=None, layout="bhtd", return_lse=False, window=None,
                     seqlens_k=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                     max_seqlen_k=None, causal=True, softcap=0.0, sinks=None):
    """Causal (masked) scaled-dot-product attention, all heads at once.

    Args:
        q: (B, H, Tq, D) queries, or (N, Tq, D).
        k: (B, Hk, Tk, D) keys, or (N, Tk, D), with Tq <= Tk. Hk may be a divisor of H
            (grouped-query attention; 1: multi-query): query head h reads key/value head
            h // (H // Hk), as flash-attn and SDPA's enable_gqa define it.
        v: (B, Hk, Tk, D) values, or (N, Tk, D).
        scale: multiplier of q @ k^T; default D ** -0.5. Any value within float32's range
            (float64's for float64 inputs), zero and negative included.
        dropout_p: probability of dropping an attention weight (training only; pass 0.0 in
            eval). The kept weights are scaled by 1 / (1 - dropout_p).
        backend: "auto" | "triton" | "reference" | "sdpa". "auto" on CUDA: for each class of
            calls, the fastest of Triton and SDPA's backends, measured on the class's first call
            (kernels/auto.py; Triton, unmeasured, for calls naming deterministic or
            fp32_precision); elsewhere PyTorch's SDPA (on CPU, the float32 reference for
            float16/bfloat16 inputs, which SDPA's CPU kernel handles less exactly).
        deterministic: the Triton backward. True: bitwise reproducible; False: dQ added with
            atomics, 5 tile matmuls instead of 7. None: the process default (True unless
            changed with lecture_flash.set_defaults). torch.use_deterministic_algorithms(True) wins.
            (A class that "auto" sends to SDPA has SDPA's backward, reproducible to rounding.)
        fp32_precision: how the Triton kernel multiplies float32 inputs, "ieee" or "tf32".
            None: the process default, which follows torch.get_float32_matmul_precision()
            ("highest", PyTorch's default: "ieee"; "high"/"medium": "tf32"). The other
            backends' matmuls follow PyTorch's setting themselves.
        window: None, or (left, right), -1 for no bound on a side (flash-attn's window_size):
            query i sees only the keys from i + (Tk - Tq) - left to i + (Tk - Tq) + right. With
            causal=True right must be 0: (left, 0) is a sliding window (Mistral, Gemma). The
            Triton kernel skips the key tiles outside every row's window (auto keeps Triton,
            unmeasured, for such calls); the PyTorch backends pass the window as a boolean mask.
        causal: True (the default): no query sees a key past its own position. False: every
            key up to the window's right side (without a window, every key: full attention,
            where Tq may exceed Tk).
        softcap: 0.0 (none), or > 0: each scaled score s becomes softcap * tanh(s / softcap)
            before the mask and softmax (Gemma 2, Grok), forward and backward.
        sinks: None, or an (H,) tensor, one logit per query head that joins every row's softmax
            denominator as a key whose value is zero (gpt-oss, StreamingLLM): the weights sum to
            less than 1. Differentiable (sinks.grad). With return_lse, lse includes the sink.
            The PyTorch backends compute softcap and sinks by the reference's arithmetic (SDPA
            has neither).
        layout: "bhtd" (the default: q (B, H, Tq, D), ...) or "bthd": q (B, Tq, H, D), k and v
            (B, Tk, Hk, D), and the output (B, Tq, H, D), as flash-attn takes them and as a qkv
            projection gives them without a transpose. Any strides either way; 4-D only.
        return_lse: also return each row's log-sum-exp of its scaled, masked scores, (B, H, Tq)
            float32 (float64 for float64 inputs), natural log, whatever the layout: what merging
            attention over parts of the keys needs (out = sum of each part's out weighted by
            exp(lse_part - lse)). Differentiable. The Triton kernel keeps it from the forward
            (auto keeps Triton, unmeasured, for such calls); the PyTorch backends compute it as
            the reference does, with the whole (Tq, Tk) score matrix. A row that sees no key has lse -inf.
        seqlens_k: None, or a (B,) integer tensor on q's device: batch row b's keys from
            seqlens_k[b] on are never seen (right-padded keys; the causal mask is otherwise
            unchanged). A row that sees no key (seqlens_k[b] = 0) gives zeros, never NaN. Values
            must lie in [0, Tk] (checked on CPU; clamped on a GPU, where a check would sync).
            The Triton kernel skips the key tiles past each row's length.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: packed sequences, flash-attn's
            varlen convention: q (total_q, H, D), k and v (total_k, Hk, D), B sequences one after
            another; cu_seqlens_* (B + 1,) integer tensors on q's device, the cumulative lengths
            (sequence b holds rows cu[b] .. cu[b + 1] - 1, from 0 to total); max_seqlen_* the
            longest lengths (None: read from cu_seqlens, one device sync). The causal mask is
            bottom-right within each sequence (its query i sees its keys j <= i + Lk - Lq), no
            query sees another sequence, and no FLOP is spent on padding. The output is
            (total_q, H, D); with return_lse, lse is (H, total_q). layout stays "bhtd".

    The mask is bottom-right aligned: query i sees keys j <= i + (Tk - Tq), which is what a
    KV cache needs (the new queries are the last Tq positions). For Tq = 2, Tk = 5:

        keys ->  0 1 2 3 4
        q 0      1 1 1 1 0
        q 1      1 1 1 1 1

    and for Tq = Tk = 4 the usual lower triangle:

        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1

    Masked positions never influence the output: a NaN or inf in a key or value that a query
    cannot see leaves that query's output (and its dQ) as if it were finite; a query that sees
    one gets NaN (kernels/masking.py).

    Returns:
        (B, H, Tq, D) (or (N, Tq, D); with layout="bthd", (B, Tq, H, D)), in q's dtype, on q's
        device; with return_lse, (that, lse).

    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, devices, Tq > Tk,
        dropout_p outside [0, 1), an unknown backend or layout, or "triton" where it cannot run.
    """
    if not (cu_seqlens_q is None and cu_seqlens_k is None and max_seqlen_q is None
            and max_seqlen_k is None):
        if seqlens_k is not None:
            raise ValueError("seqlens_k and cu_seqlens_* describe the rows two ways; pass one")
        if layout != "bhtd":
            raise ValueError("packed sequences (cu_seqlens_*) have one layout, (total, H, D); "
                             f"leave layout at 'bhtd', got {layout!r}")
        return _packed_attention(q, k, v, scale, dropout_p, backend, deterministic, fp32_precision,
                                 return_lse, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, causal=causal, softcap=softcap, sinks=sinks)
    if layout != "bhtd":  # (B, T, H, D): the same attention on transposed views, no copies
        _check_bthd(layout, q, k, v)
        got = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               scale=scale, dropout_p=dropout_p, backend=backend,
                               deterministic=deterministic, fp32_precision=fp32_precision,
                               return_lse=return_lse, window=window, seqlens_k=seqlens_k,
                               causal=causal, softcap=softcap, sinks=sinks)
        return (got[0].transpose(1, 2), got[1]) if return_lse else got.transpose(1, 2)
    resolved, signature = None, None
    if not torch.compiler.is_compiling():  # (torch.compile traces the checks instead)
        try:
            signature = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
                         v.device, type(scale), scale, type(dropout_p), dropout_p, backend,
                         deterministic, fp32_precision, return_lse, window, seqlens_k is None,
                         causal, type(softcap), softcap, None if sinks is None else
                         (type(sinks), sinks.shape, sinks.dtype, sinks.device))
            resolved = _RESOLVED.get(signature)
        except (AttributeError, TypeError):  # not tensors, or an unhashable argument
            signature = None
    if resolved is None:
        resolved = _resolve(q, k, v, scale, dropout_p, backend, deterministic, fp32_precision,
                            return_lse, window, seqlens_k is not None, causal, softcap, sinks)
        if signature is not None:
            if len(_RESOLVED) >= 4096:  # e.g. a decode loop whose Tk grows: keep it bounded
                _RESOLVED.clear()
            _RESOLVED[signature] = resolved
    strict = backend == "triton"  # asked for by name: a kernel that cannot run here raises
    backend, scale, three_d, (left, right), softcap = resolved
    q4, k4, v4 = (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)) if three_d else (q, k, v)
    # Each call's lengths are its own (their values are checked on CPU, where that is free).
    lengths = None if seqlens_k is None else check_seqlens_k(seqlens_k, q4, k4)
    if backend == "measure":
        backend = _measured_route(signature, q4, k4, v4, scale, dropout_p)
    if backend == "triton" and (return_lse or softcap or sinks is not None):
        got = flash.flash_attention(q4, k4, v4, scale, dropout_p, deterministic, fp32_precision,
                                    return_lse=return_lse, window_left=left, rows=_key_rows(lengths),
                                    strict=strict, window_right=right, softcap=softcap, sinks=sinks)
    elif softcap or sinks is not None:  # the reference's arithmetic: SDPA has neither
        mask = (causal_mask(q4.shape[2], k4.shape[2], q4.device, left, right) if lengths is None
                else key_length_mask(q4, k4, lengths, left, right=right))
        got = guarded_attention_with_mask(q4, k4, v4, mask, scale, dropout_p,
                                          softcap=softcap, sinks=sinks)
        got = got if return_lse else got[0]
    elif return_lse:  # the PyTorch paths: the reference's log-sum-exp beside their output
        out = _run(backend, q4, k4, v4, scale, dropout_p, left=left, lengths=lengths, right=right)
        mask = None if lengths is None else key_length_mask(q4, k4, lengths, left, right=right)
        got = out, _masked_lse(q4, k4, scale, left, mask, right)
    else:  # every route, Triton's included
        got = _run(backend, q4, k4, v4, scale, dropout_p, deterministic, fp32_precision, left,
                   lengths, strict, right)
    if three_d:
        return (got[0].squeeze(1), got[1].squeeze(1)) if return_lse else got.squeeze(1)
    return got


def _key_rows(lengths):
    """The kernels' Rows for per-row key lengths (None: dense)."""
    if lengths is None:
        return flash.DENSE_ROWS
    return flash.Rows(flash.KEY_LENGTHS, None, lengths, 0, 0)


def _masked_lse(q, k, scale, left=None, mask=None, right=0):
    """The reference's log-sum-exp of each row's scaled, masked scores (the causal mask with
    its window, or `mask`), for the PyTorch paths: float32 (float64 for float64 inputs); -inf
    for a row that sees no key."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = masked_scores(q.to(dtype), kv_heads_expanded(k, q.shape[1]).to(dtype), scale, left,
                           mask, right=right)
    return torch.logsumexp(scores, dim=-1) if mask is None else masked_lse(scores, mask)


def _packed_attention(q, k, v, scale, dropout_p, backend, deterministic, fp32_precision,
                      return_lse, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal=True, softcap=0.0, sinks=None):
    """causal_attention of packed sequences (its docstring says what each argument means)."""
    check_backend(backend)
    settings.check(deterministic, fp32_precision)
    cu_q, cu_k, Tq, Tk = check_packed_args(q, k, v, scale, dropout_p, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k)
    left, right = check_window(window, causal)
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    strict = backend == "triton"
    backend = _backend_for(q, backend, measure=False)
    if backend == "triton":  # the kernels read the packed rows in place
        return flash.flash_attention(q, k, v, scale, dropout_p, deterministic, fp32_precision,
                                     return_lse, left, flash.Rows(flash.PACKED, cu_q, cu_k, Tq, Tk),
                                     strict, right, softcap, sinks)
    extras = softcap or sinks is not None
    # The PyTorch paths. Where its scores are few enough, the packed rows attend as one sequence
    # under a block-diagonal mask: views, one masked attention, no copies.
    total_q, total_k = q.shape[0], k.shape[0]
    ratio, limit = PACKED_AS_ONE
    if total_q * total_k <= min(ratio * (cu_q.shape[0] - 1) * Tq * Tk, limit):
        mask, empty = block_diagonal_mask(cu_q, cu_k, total_q, total_k, left, right)
        q1, k1, v1 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, total, D)
        if extras:
            out, lse = guarded_attention_with_mask(q1, k1, v1, mask, scale, dropout_p,
                                                   softcap=softcap, sinks=sinks)
            return (out[0].transpose(0, 1), lse[0]) if return_lse else out[0].transpose(0, 1)
        out = _run_masked(backend, q1, k1, v1, scale, dropout_p, mask, empty)[0].transpose(0, 1)
        if return_lse:
            return out, _masked_lse(q1, k1, scale, mask=mask)[0]
        return out
    # Else padded into a batch, attended under the packed mask, packed again.
    mask = packed_mask(cu_q, cu_k, Tq, Tk, left, right)
    qp, kp, vp = pad(q, cu_q, Tq), pad(k, cu_k, Tk), pad(v, cu_k, Tk)
    if extras:
        out, lse = guarded_attention_with_mask(qp, kp, vp, mask, scale, dropout_p,
                                               softcap=softcap, sinks=sinks)
        out = unpad(out, cu_q, total_q)
        return (out, unpad_rows(lse, cu_q, total_q)) if return_lse else out
    out = unpad(_run_masked(backend, qp, kp, vp, scale, dropout_p, mask), cu_q, total_q)
    if return_lse:
        return out, unpad_rows(_masked_lse(qp, kp, scale, mask=mask), cu_q, total_q)
    return out


# When the PyTorch paths attend packed sequences as one (total_q x total_k scores under a
# block-diagonal mask) rather than padded (B x Tq x Tk, the longest lengths): while the one
# sequence has at most `ratio` times the padded batch's scores, and at most `limit` in all. One
# masked call over views beats padding, masking and packing again on a CPU (bench/varlen.py,
# 2-core CPU, 9 documents of 254 tokens: 2.3x faster forward), though it computes more scores
# (those across documents) as documents get more numerous.
PACKED_AS_ONE = (4, 1 << 22)


def _check_bthd(layout, q, k, v):
    if layout != "bthd":
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"layout='bthd' needs 4-D (B, T, H, D) tensors; {name} is {shape}")


def _run(route, q, k, v, scale, dropout_p, deterministic=None, fp32_precision=None, left=None,
         lengths=None, strict=False, right=0):
    """Attention of validated 4-D tensors by one route: "triton", "reference", "sdpa" or an
    SDPA pinned to one backend (auto.ROUTES); lengths: per-row key lengths (int32) or None;
    strict: Triton raises where its kernels cannot run (else the guard in flash.py computes the
    call). masking.py keeps masked positions out of the PyTorch paths' outputs; the kernel does
    it in its tiles."""
    if route == "triton":
        return flash.flash_attention(q, k, v, scale, dropout_p, deterministic, fp32_precision,
                                     window_left=left, rows=_key_rows(lengths), strict=strict,
                                     window_right=right)
    if lengths is not None:
        return _run_masked(route, q, k, v, scale, dropout_p,
                           key_length_mask(q, k, lengths, left, right=right))
    if route == "reference":
        window = (-1 if left is None else left, -1 if right is None else right)
        return guarded_causal(lambda a, b, c: causal_attention_reference(
            a, b, c, scale=scale, dropout_p=dropout_p, window=window, causal=right == 0),
            q, k, v, left, right)
    pinned = auto.ROUTES[route]
    return guarded_causal(lambda a, b, c: _sdpa(a, b, c, scale, dropout_p, pinned, left,
                                                right=right), q, k, v, left, right)


def _run_masked(route, q, k, v, scale, dropout_p, mask, empty=None):
    """Attention of 4-D tensors under a bool mask (B, 1, Tq, Tk), True where a query sees a key,
    by a PyTorch route: the reference's arithmetic, or SDPA with the mask. A row that sees no key
    gives zeros (SDPA sees every key there, and the row is zeroed: no NaN in any gradient).
    empty: those rows, (B, 1, Tq, 1) bool, where the caller knows them (else reduced from mask;
    on a CPU, where reading it is free, nothing is patched when no row is empty); False: the
    caller knows that no row is empty."""
    if route == "reference":
        def attend(a, b, c):
            return attention_with_mask(a, b, c, mask, scale, dropout_p)[0]
    else:  # SDPA's backends that take a mask are PyTorch's own choice (no pinning)
        if empty is None:
            empty = ~mask.any(-1, keepdim=True)
        if empty is False or (mask.device.type == "cpu" and not torch.compiler.is_compiling()
                              and not empty.any()):
            def attend(a, b, c):
                return _sdpa(a, b, c, scale, dropout_p, mask=mask)
        else:
            def attend(a, b, c):
                return _sdpa(a, b, c, scale, dropout_p, mask=mask | empty).masked_fill(empty, 0.0)
    return guarded_masked(attend, q, k, v, mask)


# (signature, whether the call needs gradients) -> the route auto measured for its class.
_MEASURED = {}


def _measured_route(signature, q, k, v, scale, dropout_p):
    """backend="auto" on CUDA with the default options: the route kernels/auto.py measured
    fastest for this call's class (measuring it now if the class is new)."""
    if torch.are_deterministic_algorithms_enabled():
        return "triton"  # the deterministic backward by default, which SDPA's fused ones are not
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    route = _MEASURED.get((signature, needs_grad)) if signature is not None else None
    if route is not None:
        return route
    cls = auto.class_of(q, k, dropout_p, needs_grad)
    if not auto.can_measure(q):  # tracing or capturing: what was measured before, else Triton
        route = auto.CHOOSER.chosen.get(cls, "triton")
        if torch.compiler.is_compiling() and auto.ROUTES[route] is not None:
            route = "sdpa"  # traced without sdpa_kernel's context: inductor picks SDPA's kernel
        return route
    # strict: a Triton kernel that cannot run here raises, and the chooser leaves Triton out.
    passes = {r: auto.one_pass(lambda a, b, c, r=r: _run(r, a, b, c, scale, dropout_p, strict=True),
                               q, k, v, needs_grad) for r in auto.ROUTES}
    route = auto.CHOOSER.choose(cls, passes, devices=[q.device] if q.is_cuda else [])
    if signature is not None:
        if len(_MEASURED) >= 4096:
            _MEASURED.clear()
        _MEASURED[(signature, needs_grad)] = route
    return route


def _forget_routes():
    """A Triton specialisation failed to compile or load (flash.py's guard): calls resolve and
    measure afresh, so that supports() sends that specialisation elsewhere."""
    _RESOLVED.clear()
    _MEASURED.clear()
    for cls, route in list(auto.CHOOSER.chosen.items()):
        if route == "triton":
            del auto.CHOOSER.chosen[cls]


if flash is not None:
    flash.on_failure(_forget_routes)


def auto_report():
    """backend="auto"'s measured choices in this process: per class of calls (see
    kernels/auto.py), the route chosen and every route's median milliseconds."""
    return auto.report()


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None, backend="auto",
                     window=None, causal=True, softcap=0.0, return_lse=False, num_splits=0):
    """Attention of new queries to a KV cache of fixed size, with each row's length a device
    tensor: every shape is fixed and nothing is read back to the host, so a CUDA graph can
    capture a decode step once and replay it as the cache fills.

    Args:
        q: (B, H, Tq, D) the newest Tq positions' queries (Tq = 1 for one token per step).
        k_cache, v_cache: (B, Hk, S, D), S >= Tq slots (Hk dividing H: grouped-query heads),
            of which row b's first cache_seqlens[b] hold keys and values (the new ones
            included); the rest are never seen (they may hold anything, NaN included).
        cache_seqlens: (B,) integer tensor on q's device, values in [0, S] (checked on CPU;
            clamped on a GPU, where a check would read the device and break graph capture).
        scale: multiplier of q @ k^T; default D ** -0.5.
        backend: "auto" (the Triton kernel on CUDA, else PyTorch's SDPA), "triton", "sdpa" or
            "reference".
        window, causal, softcap: the mask and softcapping, as causal_attention's (relative to
            each query's position within its row).
        return_lse: also return each row's log-sum-exp, (B, H, Tq) float32, natural log.
        num_splits: how many key ranges the Triton kernel splits each row into (0: its own
            choice, 1: none), flash-attn's knob; the PyTorch paths have no ranges.

    The queries are the last Tq positions of each row: query i of row b sits at position
    cache_seqlens[b] - Tq + i and sees the keys up to it (causal), within the window, and
    below cache_seqlens[b]. A query that sees no key gets zeros. The Triton kernel skips the
    key tiles past each row's length and, where B * H programs would leave the GPU idle, splits
    the keys into ranges that run side by side and are merged after (flash-decoding). On a CPU
    the PyTorch paths skip the slots past the longest row, and rows of one length need no
    key mask (_decode_rows).

    Returns:
        (B, H, Tq, D) in q's dtype; with return_lse, (that, lse).
    """
    signature = None
    if not torch.compiler.is_compiling():  # a decode loop repeats one signature: checked once
        try:
            signature = (q.shape, k_cache.shape, v_cache.shape, q.dtype, k_cache.dtype,
                         v_cache.dtype, q.device, k_cache.device, v_cache.device,
                         type(cache_seqlens), cache_seqlens.shape, cache_seqlens.dtype,
                         cache_seqlens.device, type(scale), scale, backend, window, causal,
                         type(softcap), softcap, return_lse, type(num_splits), num_splits)
            resolved = _DECODE_RESOLVED.get(signature)
        except (AttributeError, TypeError):
            signature = resolved = None
    if signature is None or resolved is None:
        resolved = _resolve_decode(q, k_cache, v_cache, cache_seqlens, scale, backend, window,
                                   causal, softcap, num_splits)
        if signature is not None:
            if len(_DECODE_RESOLVED) >= 1024:
                _DECODE_RESOLVED.clear()
            _DECODE_RESOLVED[signature] = resolved
    route, scale, (left, right), softcap, lengths_only = resolved
    if q.dim() == 3:
        q, k_cache, v_cache = q.unsqueeze(1), k_cache.unsqueeze(1), v_cache.unsqueeze(1)
    B, _, Tq, _ = q.shape
    S = k_cache.shape[2]
    lengths, shortest, longest = length_range("cache_seqlens", cache_seqlens,
                                              f"the cache's {S} slots", S)
    if route == "triton":
        lengths = lengths.to(torch.int32).contiguous()  # the kernel reads it by index
        return flash.decode_attention(q, k_cache, v_cache, lengths, scale, backend == "triton",
                                      left, right, softcap, return_lse, num_splits)
    # On a CPU the lengths were read by the range check: the slots past the longest row are
    # never read (views of the cache's first slots), and where every row holds the same number
    # of keys the call is causal_attention's on those slots, its masks relative to the same
    # last positions, with no key-length mask.
    if lengths_only and not (softcap or return_lse):
        return _decode_rows(route, q, k_cache, v_cache, lengths, shortest, longest, scale)
    k_cache, v_cache = _first_slots(k_cache, v_cache, longest)
    if shortest is not None and shortest == longest >= Tq and not (softcap or return_lse):
        return _run(route, q, k_cache, v_cache, scale, 0.0, left=left, right=right)
    mask = key_length_mask(q, k_cache, lengths, left, cache=True, right=right)
    if softcap or return_lse:
        got = guarded_attention_with_mask(q, k_cache, v_cache, mask, scale, softcap=softcap)
        return got if return_lse else got[0]
    return _run_masked(route, q, k_cache, v_cache, scale, 0.0, mask)


def _first_slots(k_cache, v_cache, longest):
    """The caches' first `longest` slots (views), where the range check read it: the slots
    past the longest row are never read."""
    if longest is not None and 0 < longest < k_cache.shape[2]:
        return k_cache.narrow(2, 0, longest), v_cache.narrow(2, 0, longest)
    return k_cache, v_cache


def _decode_rows(route, q, k_cache, v_cache, lengths, shortest, longest, scale):
    """decode_attention on a PyTorch route of one new query a row, (B, H, 1, D), whose only mask
    is the rows' lengths (no window, no softcap); shortest, longest: the lengths' range where it
    was read (a CPU), else None.

    - Grouped heads: the H // Hk queries of a key/value head see the same keys, so they attend
      as that many rows of one head, a plain SDPA call (1.6x faster on a CPU than SDPA's
      enable_gqa at 8 query heads over 2).
    - Rows of one length (one sequence; a batch advancing in step) see every key they hold:
      no mask, and nothing masked to guard (masking.guarded_causal's first case), so SDPA is
      called as it is where _sdpa would change nothing (a positive scale, no overlapping
      strides: judged on the whole caches, whose first slots keep their layout). Fewer keys
      and no mask: faster than SDPA over the whole cache with one.
    """
    B, H, _, D = q.shape
    Hk = k_cache.shape[1]
    rows = q if H == Hk else q.reshape(B, Hk, H // Hk, D)
    direct = route == "sdpa" and scale > 0 and not (_overlaps(rows) or _overlaps(k_cache)
                                                    or _overlaps(v_cache))
    k_cache, v_cache = _first_slots(k_cache, v_cache, longest)
    if shortest is not None and shortest == longest > 0:
        out = (_torch_sdpa(rows, k_cache, v_cache, scale=scale) if direct else
               _run(route, rows, k_cache, v_cache, scale, 0.0, left=None, right=None))
    else:
        mask = _positions(k_cache.shape[2], q.device) < lengths.view(B, 1, 1, 1)
        # every row sees a key where the range check read a shortest length above 0
        out = _run_masked(route, rows, k_cache, v_cache, scale, 0.0, mask,
                          empty=False if shortest else None)
    return out if H == Hk else out.reshape(B, H, 1, D)


_DECODE_RESOLVED = {}  # decode_attention's signature -> _resolve_decode's answer


def _resolve_decode(q, k_cache, v_cache, cache_seqlens, scale, backend, window, causal, softcap,
                    num_splits):
    """decode_attention's checks of everything but the lengths' values: (route, scale, the
    mask's (left, right), softcap, lengths_only), or the error naming the argument.
    lengths_only: one query a row on a PyTorch route, masked by nothing but the lengths
    (_decode_rows)."""
    check_backend(backend)
    left, right = check_window(window, causal)
    softcap = check_softcap(softcap)
    q, k_cache, v_cache, _ = check_attention_args(q, k_cache, v_cache, scale, 0.0,
                                                  full=left is None and right is None)
    B, _, Tq, D = q.shape
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if (cache_seqlens.shape != (B,) or cache_seqlens.is_floating_point()
            or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool):
        raise ValueError(f"cache_seqlens must be a ({B},) integer tensor (one length per batch "
                         f"row), got {cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: the kernel's choice), got {num_splits!r}")
    scale = D ** -0.5 if scale is None else float(scale)
    route = _backend_for(q, backend, measure=False)
    lengths_only = route != "triton" and Tq == 1 and left is None and right in (0, None)
    return route, scale, (left, right), softcap, lengths_only
