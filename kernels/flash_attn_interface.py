"""flash-attn's functions on our kernels: the same names, arguments, defaults and return values,
so that code written for flash-attn 2.x (or FlashAttention-3's interface where nanochat and
modded-nanogpt call it) changes one import:

    from lecture_flash import flash_attn_interface as flash_attn
    y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(1024, 0))   # (B, T, H, D)

What flash-attn means by each argument (its docstrings, flash-attn 2.8):
- q (B, Tq, H, D), k and v (B, Tk, Hk, D), Hk dividing H (grouped-query heads); varlen:
  (total, H, D) with cu_seqlens (B + 1,) int32. Outputs in the same layout.
- causal: the mask aligned bottom-right (query i sees keys j <= i + Tk - Tq), as ours.
- window_size (left, right), -1 for no bound: query i sees keys i + Tk - Tq - left ..
  i + Tk - Tq + right; with causal=True right is 0.
- softcap > 0: scores become softcap * tanh(score / softcap) before the softmax.
- deterministic: the backward must be reproducible (False lets the kernel add dQ with atomics).
- return_attn_probs: also return the softmax's log-sum-exp, (B, H, Tq) float32 ((H, total) for
  varlen), and the attention probabilities (flash-attn: "for testing only"); ours are the
  softmax weights of the same mask, (B, H, Tq, Tk) float32 (varlen: padded to the longest
  sequences), before dropout.

Anything we do not implement raises NotImplementedError naming it: ALiBi (alibi_slopes) and a
paged cache (block_table). Nothing is accepted and ignored.
"""
import torch

from . import dispatch
from .masking import guarded_attention_with_mask
from .packing import pad
from .reference import causal_mask, key_length_mask, masked_scores, packed_mask, softmax_and_lse
from .validation import check_window, kv_heads_expanded

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _not_implemented(**given):
    """NotImplementedError naming each argument given that we do not implement."""
    for name, value in given.items():
        if value is not None:
            raise NotImplementedError(
                f"lecture_flash.flash_attn_interface: {name} is not implemented "
                f"({'ALiBi biases' if name == 'alibi_slopes' else 'a paged KV cache'}); "
                f"pass {name}=None or call flash-attn itself")


def _mask(causal, window_size):
    """causal_attention's (causal, window) for flash-attn's: with causal the right side is 0
    (flash-attn ignores it), and (-1, -1) is no window."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), -1 for no bound, got {window_size!r}")
    left, right = (int(x) for x in window_size)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return bool(causal), None
    return bool(causal), (max(left, -1), max(right, -1))


def _options(dropout_p, softmax_scale, causal, window_size, softcap, deterministic):
    causal, window = _mask(causal, window_size)
    return dict(dropout_p=dropout_p, scale=softmax_scale, causal=causal, window=window,
                softcap=softcap, deterministic=True if deterministic else None)


def _probs(q, k, scale, mask, softcap):
    """The softmax weights (B, H, Tq, Tk) float32 of 4-D (B, H, T, D) q, k under a bool mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = kv_heads_expanded(k, q.shape[1])
    scores = masked_scores(q.float(), k.float(), scale, mask=mask, softcap=softcap)
    return softmax_and_lse(scores, mask)[0]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's flash_attn_func: q (B, Tq, H, D), k and v (B, Tk, Hk, D) -> (B, Tq, H, D);
    with return_attn_probs, (out, softmax_lse (B, H, Tq), probs (B, H, Tq, Tk))."""
    _not_implemented(alibi_slopes=alibi_slopes)
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, deterministic)
    if not return_attn_probs:
        return dispatch.causal_attention(q, k, v, layout="bthd", **options)
    out, lse = dispatch.causal_attention(q, k, v, layout="bthd", return_lse=True, **options)
    left, right = check_window(options["window"], options["causal"])
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    mask = causal_mask(qh.shape[2], kh.shape[2], q.device, left, right)
    return out, lse, _probs(qh, kh, softmax_scale, mask, softcap)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func of qkv (B, T, 3, H, D), the three as views (no copies)."""
    _check_packed("qkv", qkv, 5, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func of q (B, Tq, H, D) and kv (B, Tk, 2, Hk, D)."""
    _check_packed("kv", kv, 5, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _check_packed(name, x, dims, n):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims or x.shape[dims - 3] != n:
        shape = "(B, T, " if dims == 5 else "(total, "
        raise ValueError(f"{name} must be {shape}{n}, H, D), got shape {tuple(x.shape)}")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """flash-attn's flash_attn_varlen_func: packed q (total_q, H, D), k and v (total_k, Hk, D),
    cu_seqlens_* (B + 1,) int32 -> (total_q, H, D); with return_attn_probs, (out, softmax_lse
    (H, total_q), probs padded to (B, H, max_seqlen_q, max_seqlen_k))."""
    _not_implemented(alibi_slopes=alibi_slopes, block_table=block_table)
    options = _options(dropout_p, softmax_scale, causal, window_size, softcap, deterministic)
    packed = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if not return_attn_probs:
        return dispatch.causal_attention(q, k, v, **packed, **options)
    out, lse = dispatch.causal_attention(q, k, v, return_lse=True, **packed, **options)
    left, right = check_window(options["window"], options["causal"])
    mask = packed_mask(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, left, right)
    return out, lse, _probs(pad(q, cu_seqlens_q, max_seqlen_q), pad(k, cu_seqlens_k, max_seqlen_k),
                            softmax_scale, mask, softcap)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func of qkv (total, 3, H, D), one cu_seqlens for queries and keys."""
    _check_packed("qkv", qkv, 4, 3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func of q (total_q, H, D) and kv (total_k, 2, Hk, D)."""
    _check_packed("kv", kv, 4, 2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's flash_attn_with_kvcache: attention of q (B, Tq, H, D) to a cache
    k_cache, v_cache (B_cache, S, Hk, D), with the new keys and values k, v (B, T_new, Hk, D), if
    given, written into the caches in place first, row b's at slots cache_seqlens[b] ..
    cache_seqlens[b] + T_new - 1 (each row its own position).

    cache_seqlens: an int or (B,) int tensor, each row's keys before the new ones (None: the
    whole cache, without new keys). cache_batch_idx: (B,) which cache row batch row b uses
    (None: row b). cache_leftpad: (B,) the first valid slot of each row (None: 0); keys before
    it are never seen. rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2): rotary embedding of
    the first rotary_dim entries of the new k at positions cache_seqlens[b] - leftpad[b] + t,
    and of q at the same positions when causal or windowed, else all at cache_seqlens[b] -
    leftpad[b]; rotary_interleaved: pairs (0, 1), (2, 3), ... (GPT-J) rather than halves
    (GPT-NeoX). The queries are the last Tq positions of each row's keys (new ones included).
    num_splits: the Triton kernel's key ranges (0: its choice). Returns (B, Tq, H, D); with
    return_softmax_lse, (out, lse (B, H, Tq) float32).

    Every step is a device op with no read back to the host (the slots' range is checked on a
    CPU only), so a CUDA graph can capture a decode step that calls it.
    """
    _not_implemented(alibi_slopes=alibi_slopes, block_table=block_table)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    B, Tq = q.shape[:2]
    S = k_cache.shape[1]
    device = q.device
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new keys and values), or neither")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is needed to append k and v (where each row's new "
                             "keys go)")
        cache_seqlens = S
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    elif not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be an int or a ({B},) integer tensor, got "
                         f"{getattr(cache_seqlens, 'shape', type(cache_seqlens).__name__)}")
    seqlens = cache_seqlens.to(torch.int64)
    rows = None
    if cache_batch_idx is not None:
        if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.shape != (B,):
            raise ValueError(f"cache_batch_idx must be a ({B},) integer tensor")
        rows = cache_batch_idx.to(torch.int64)
    elif k_cache.shape[0] != B:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows for q's batch of {B}; pass "
                         "cache_batch_idx to say which row each batch row uses")
    start = None if cache_leftpad is None else cache_leftpad.to(torch.int64)
    rotate = None
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        base = seqlens if start is None else seqlens - start
        rotate = _Rotary(rotary_cos, rotary_sin, rotary_interleaved, q.shape[-1])
        q = rotate(q, base if (causal or tuple(window_size) != (-1, -1)) else None, base)
    total = seqlens
    if k is not None:
        T_new = k.shape[1]
        if device.type == "cpu" and not torch.compiler.is_compiling() and bool((seqlens + T_new > S).any()):
            raise ValueError(f"cache_seqlens + the {T_new} new keys pass the cache's {S} slots")
        if rotate is not None:
            k = rotate(k, base, base)
        slot = seqlens.view(B, 1) + torch.arange(T_new, device=device).view(1, T_new)
        row = (torch.arange(B, device=device) if rows is None else rows).view(B, 1).expand(B, T_new)
        k_cache[row, slot] = k.to(k_cache.dtype)  # in place, as flash-attn does
        v_cache[row, slot] = v.to(v_cache.dtype)
        total = seqlens + T_new
    kc, vc = (k_cache, v_cache) if rows is None else (k_cache[rows], v_cache[rows])
    qh, kh, vh = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)  # (B, H, T, D) views
    causal, window = _mask(causal, window_size)
    if start is None:
        got = dispatch.decode_attention(qh, kh, vh, total.to(torch.int32), scale=softmax_scale,
                                        window=window, causal=causal, softcap=softcap,
                                        return_lse=return_softmax_lse, num_splits=num_splits)
    else:  # keys before each row's first slot hidden too: a mask the PyTorch paths take
        got = _left_padded(qh, kh, vh, total, start, softmax_scale, causal, window, softcap)
        got = got if return_softmax_lse else got[0]
    if return_softmax_lse:
        return got[0].transpose(1, 2), got[1]
    return got.transpose(1, 2)


def _left_padded(q, k, v, total, start, scale, causal, window, softcap):
    """(out, lse) of a decode step whose rows' keys are slots start[b] .. total[b] - 1."""
    left, right = check_window(window, causal)
    mask = key_length_mask(q, k, total, left, cache=True, right=right)
    mask = mask & (torch.arange(k.shape[2], device=q.device) >= start.view(-1, 1, 1, 1))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return guarded_attention_with_mask(q, k, v, mask, scale, softcap=softcap)


class _Rotary:
    """Rotary embedding of the first rotary_dim entries of x (B, T, H, D) at per-row positions,
    flash-attn's convention: cos, sin (seqlen_ro, rotary_dim / 2); interleaved: the pairs
    (x0, x1), (x2, x3), ...; else the halves (x[:r/2], x[r/2:r]). Computed in float32."""

    def __init__(self, cos, sin, interleaved, D):
        if cos.dim() != 2 or cos.shape != sin.shape or 2 * cos.shape[1] > D:
            raise ValueError(f"rotary_cos and rotary_sin must be (seqlen_ro, rotary_dim / 2) with "
                             f"rotary_dim <= head dim {D}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        self.cos, self.sin, self.interleaved = cos.float(), sin.float(), interleaved

    def __call__(self, x, causal_base, base):
        """x rotated: token t of row b at position causal_base[b] + t, or with causal_base None
        every token at base[b]."""
        B, T = x.shape[:2]
        if causal_base is None:
            pos = base.view(B, 1).expand(B, T)
        else:
            pos = causal_base.view(B, 1) + torch.arange(T, device=x.device).view(1, T)
        pos = pos.clamp(0, self.cos.shape[0] - 1)
        cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # (B, T, 1, r/2)
        r = 2 * self.cos.shape[1]
        head, rest = x[..., :r].float(), x[..., r:]
        if self.interleaved:
            a, b = head[..., 0::2], head[..., 1::2]
            turned = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        else:
            a, b = head[..., :r // 2], head[..., r // 2:]
            turned = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return torch.cat([turned.to(x.dtype), rest], dim=-1)
