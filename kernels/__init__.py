"""Causal scaled-dot-product attention with the heads as a batch dimension.

    from kernels import causal_attention, MultiHeadAttention
    out = causal_attention(q, k, v)          # q: (B, H, Tq, D), k, v: (B, H, Tk, D)
    sa = MultiHeadAttention(n_head, head_size, n_embd=n_embd, dropout=dropout)  # the lecture's module

Backends: "triton" (fused FlashAttention-2-style kernel, CUDA), "sdpa" (PyTorch's
scaled_dot_product_attention), "reference" (the explicit-softmax oracle), and "auto".
"""
import torch
import torch.nn.functional as F

from . import settings
from .masking import bad_positions, guarded_causal, seen_so_far, zero_positions
from .reference import causal_attention_reference, causal_mask
from .settings import set_defaults
from .validation import check_attention_args, check_backend, with_positive_scale

try:
    from . import flash
except ImportError as e:  # no triton on this platform (macOS, Windows): pure-PyTorch only
    flash = None
    _FLASH_IMPORT_ERROR = str(e)

__all__ = ["causal_attention", "decode_attention", "MultiHeadAttention", "available_backends",
           "causal_attention_reference", "default_device", "set_defaults"]


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


def available_backends(device=None):
    """The backends that can run on `device` (default: CUDA if present, else CPU), best first."""
    device = default_device(device)
    names = ["sdpa", "reference"]
    if flash is not None and not flash.TOO_OLD and (device.type == "cuda" or flash.INTERPRET):
        names.insert(0, "triton")
    return names


def _overlaps(t):
    """Whether two elements of t may share memory (strides such as stride_t = stride_d = 1).
    A review saw PyTorch's CPU SDPA return garbage for such inputs; the shapes tried here with
    torch 2.13 came out right, and a copy costs little, so the sdpa backend copies them."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    reach = 0  # the largest offset the smaller-stride dimensions span
    for stride, n in dims:
        if stride <= reach:
            return True
        reach += stride * (n - 1)
    return False


def _sdpa(q, k, v, scale, dropout_p):
    Tq, Tk = q.shape[-2], k.shape[-2]
    q, k, v = (t.contiguous() if _overlaps(t) else t for t in (q, k, v))
    q, scale = with_positive_scale(q, scale)  # SDPA's fused kernels give NaN for scale <= 0
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    if Tq == 1:  # one new query sees every key: no mask at all
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    # SDPA's is_causal aligns top-left when Tq != Tk; ours is bottom-right, so pass the mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device),
                                          dropout_p=dropout_p, scale=scale)


def _auto_backend(q):
    if q.device.type == "cuda" and _triton_unavailable(q) is None:
        return "triton"
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # PyTorch's CPU SDPA kernel loses precision in the bf16 backward (dV error up to 2.3x
        # that of plain bf16 math, see tests/test_backends.py); the float32 path is exact enough.
        return "reference"
    return "sdpa"


# Argument checks and the backend choice depend only on the arguments' shapes, dtypes, devices,
# types and values: a call whose signature was seen before skips them (a training run repeats
# one signature thousands of times; the checks cost about 9 us of its host time on a 2-core CPU).
_RESOLVED = {}


def _resolve(q, k, v, scale, dropout_p, backend, deterministic, fp32_precision):
    """(backend to run, scale, whether the inputs are 3-D), or the error for bad arguments."""
    check_backend(backend)
    settings.check(deterministic, fp32_precision)
    q4, _, _, three_d = check_attention_args(q, k, v, scale, dropout_p)
    scale = q4.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = _auto_backend(q4)  # picks "triton" only where it can run
    elif backend == "triton":
        why = _triton_unavailable(q4)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run here: {why}")
    return backend, scale, three_d


def causal_attention(q, k, v, *, scale=None, dropout_p=0.0, backend="auto", deterministic=None,
                     fp32_precision=None):
    """Causal (masked) scaled-dot-product attention, all heads at once.

    Args:
        q: (B, H, Tq, D) queries, or (N, Tq, D).
        k: (B, H, Tk, D) keys, or (N, Tk, D), with Tq <= Tk.
        v: (B, H, Tk, D) values, or (N, Tk, D).
        scale: multiplier of q @ k^T; default D ** -0.5. Any value within float32's range
            (float64's for float64 inputs), zero and negative included.
        dropout_p: probability of dropping an attention weight (training only; pass 0.0 in
            eval). The kept weights are scaled by 1 / (1 - dropout_p).
        backend: "auto" | "triton" | "reference" | "sdpa". "auto" picks Triton on CUDA for
            float16/bfloat16/float32 with D <= 256, else PyTorch's SDPA (on CPU, the float32
            reference for float16/bfloat16 inputs, which SDPA's CPU kernel handles less exactly).
        deterministic: the Triton backward. True: bitwise reproducible; False: dQ added with
            atomics, 5 tile matmuls instead of 7. None: the process default (True unless
            changed with kernels.set_defaults). torch.use_deterministic_algorithms(True) wins.
        fp32_precision: how the Triton kernel multiplies float32 inputs, "ieee" or "tf32".
            None: the process default, which follows torch.get_float32_matmul_precision()
            ("highest", PyTorch's default: "ieee"; "high"/"medium": "tf32"). The other
            backends' matmuls follow PyTorch's setting themselves.

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
        (B, H, Tq, D) (or (N, Tq, D)), in q's dtype, on q's device.

    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, devices, Tq > Tk,
        dropout_p outside [0, 1), an unknown backend, or "triton" where it cannot run.
    """
    resolved, signature = None, None
    if not torch.compiler.is_compiling():  # (torch.compile traces the checks instead)
        try:
            signature = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
                         v.device, type(scale), scale, type(dropout_p), dropout_p, backend,
                         deterministic, fp32_precision)
            resolved = _RESOLVED.get(signature)
        except (AttributeError, TypeError):  # not tensors, or an unhashable argument
            signature = None
    if resolved is None:
        resolved = _resolve(q, k, v, scale, dropout_p, backend, deterministic, fp32_precision)
        if signature is not None:
            if len(_RESOLVED) >= 4096:  # e.g. a decode loop whose Tk grows: keep it bounded
                _RESOLVED.clear()
            _RESOLVED[signature] = resolved
    backend, scale, three_d = resolved
    q4, k4, v4 = (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)) if three_d else (q, k, v)
    if backend == "triton":
        out = flash.flash_attention(q4, k4, v4, scale, dropout_p, deterministic, fp32_precision)
    elif backend == "sdpa":  # masking.py keeps masked positions out (the kernel, in its tiles)
        out = guarded_causal(lambda a, b, c: _sdpa(a, b, c, scale, dropout_p), q4, k4, v4)
    else:
        out = guarded_causal(lambda a, b, c: causal_attention_reference(
            a, b, c, scale=scale, dropout_p=dropout_p), q4, k4, v4)
    return out.squeeze(1) if three_d else out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None):
    """Attention of new queries to a KV cache of fixed size, with each row's length a device
    tensor: every shape is fixed and nothing is read back to the host, so a CUDA graph can
    capture a decode step once and replay it as the cache fills.

    Args:
        q: (B, H, Tq, D) the newest Tq positions' queries (Tq = 1 for one token per step).
        k_cache, v_cache: (B, H, S, D), S >= Tq slots, of which row b's first cache_seqlens[b]
            hold keys and values (the new ones included); the rest are masked out (for now they
            must hold finite values, as a zero-initialised cache does).
        cache_seqlens: (B,) integer tensor on q's device.
        scale: multiplier of q @ k^T; default D ** -0.5.

    The queries are the last Tq positions of each row: query i of row b sees keys
    j <= cache_seqlens[b] - Tq + i (causal, bottom-right within the row's length). A query that
    sees no key gets zeros.

    Returns:
        (B, H, Tq, D) in q's dtype. (For now PyTorch's SDPA computes it, with a mask built from
        cache_seqlens on the device.)
    """
    q, k_cache, v_cache, _ = check_attention_args(q, k_cache, v_cache, scale, 0.0)
    B, _, Tq, D = q.shape
    S = k_cache.shape[2]
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if (cache_seqlens.shape != (B,) or cache_seqlens.is_floating_point()
            or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool):
        raise ValueError(f"cache_seqlens must be a ({B},) integer tensor (one length per batch "
                         f"row), got {cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    scale = D ** -0.5 if scale is None else float(scale)
    q, scale = with_positive_scale(q, scale)
    last = cache_seqlens.view(B, 1, 1) - Tq + torch.arange(Tq, device=q.device).view(1, Tq, 1)
    visible = torch.arange(S, device=q.device).view(1, 1, S) <= last  # (B, Tq, S)
    # Masked slots never reach the output (kernels/masking.py): non-finite ones are zeroed, and a
    # query that sees one gets NaN.
    bad = bad_positions(k_cache, v_cache)  # (B, H, S)
    seen = seen_so_far(bad).gather(-1, last.clamp(min=0).view(B, 1, Tq).expand(-1, bad.shape[1], -1))
    out = F.scaled_dot_product_attention(q, zero_positions(k_cache, bad), zero_positions(v_cache, bad),
                                         attn_mask=visible.unsqueeze(1), scale=scale)
    out = out.masked_fill((seen & (last >= 0).view(B, 1, Tq)).unsqueeze(-1), float("nan"))
    return out.masked_fill((last < 0).view(B, 1, Tq, 1), 0.0)


# The batched module runs causal_attention above (and a lecture script named gpt.py can import it
# from here without importing this project's gpt package).
from .modules import MultiHeadAttention  # noqa: E402
