"""scaled_dot_product_attention: PyTorch's SDPA signature on our causal attention, for code
written against torch.nn.functional.scaled_dot_product_attention (nanoGPT's one call).
"""
import warnings

import torch

from .dispatch import _torch_sdpa, causal_attention
from .reference import key_length_mask

_SAID = set()  # the reasons scaled_dot_product_attention handed a call to PyTorch, warned once


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention's signature and meaning, for
    monkey-patching code written against it (nanoGPT's `F.scaled_dot_product_attention(q, k,
    v, is_causal=True)`):

        import torch.nn.functional as F, kernels
        F.scaled_dot_product_attention = lecture_flash.scaled_dot_product_attention

    Causal calls without a mask run causal_attention (backend "auto"): with as many queries as
    keys; with fewer queries than keys too, keeping PyTorch's top-left alignment (query i sees
    keys j <= i, the opposite of causal_attention's bottom-right), which never reaches keys past
    the query count; with grouped key/value heads where enable_gqa=True. So does a boolean
    attn_mask (is_causal=False) that is a causal mask of a right-padded batch, (B or 1, 1, T, T)
    with row b seeing keys j <= i and j < length_b (`torch.tril(ones) & (arange(T) <
    lengths[:, None])`, the padded rows seeing every real key up to theirs): it runs
    causal_attention with seqlens_k. Telling that mask apart costs one read of the device per
    call (so under torch.compile or CUDA-graph capture, where that cannot happen, such masks go
    to PyTorch). Everything else (other masks, non-causal attention, more queries than keys,
    inputs not 3- or 4-D, a value head dim other than the key's) goes to PyTorch's own SDPA, with
    a warning saying why, once per process and reason.
    """
    why, lengths = None, None
    if attn_mask is None and not is_causal:
        why = "non-causal attention"
    elif not all(isinstance(t, torch.Tensor) and t.dim() in (3, 4) and t.dim() == query.dim()
                 for t in (query, key, value)):
        why = "inputs that are not all 3-D or all 4-D tensors"
    elif value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        why = "a value or key head dim other than the query's"
    elif query.shape[-2] > key.shape[-2]:
        why = "more queries than keys"
    elif key.shape[:-3] != query.shape[:-3] or value.shape[:-1] != key.shape[:-1]:
        why = "batch shapes that differ (broadcast)"
    elif not (query.dtype == key.dtype == value.dtype and query.device == key.device == value.device):
        why = "inputs of mixed dtypes or devices"
    elif key.shape[-3] != query.shape[-3] and (query.dim() == 3 or not enable_gqa):
        why = "fewer key/value heads than query heads in 3-D inputs or without enable_gqa=True"
    elif attn_mask is not None:
        why, lengths = _padding_mask_lengths(query, key, attn_mask, is_causal)
    if why is not None:
        if why not in _SAID:
            _SAID.add(why)
            warnings.warn(f"lecture_flash.scaled_dot_product_attention: {why} goes to PyTorch's SDPA",
                          stacklevel=2)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    Tq = query.shape[-2]
    if key.shape[-2] > Tq:  # top-left: keys past the last query are seen by none
        key, value = key[..., :Tq, :], value[..., :Tq, :]
    return causal_attention(query, key, value, scale=scale, dropout_p=dropout_p, seqlens_k=lengths)


def _padding_mask_lengths(q, k, mask, is_causal):
    """(why not, None), or (None, lengths (B,)) where mask is the causal mask of a right-padded
    batch (scaled_dot_product_attention's docstring): one read of the device."""
    if is_causal:
        return "an attn_mask with is_causal=True", None  # PyTorch's SDPA refuses it: it says why
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return "an attn_mask that is not boolean", None
    if q.dim() != 4 or k.dim() != 4 or mask.dim() != 4:
        return "an attn_mask with inputs or a mask that are not 4-D", None
    B, T = q.shape[0], q.shape[2]
    if k.shape[2] != T or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or mask.shape[2:] != (T, T):
        return "an attn_mask other than (B or 1, 1, T, T) over as many queries as keys", None
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return "an attn_mask under torch.compile or CUDA-graph capture", None
    lengths = mask[:, 0, -1].sum(-1)  # the last row sees every real key
    if not torch.equal(mask[:, 0], key_length_mask(q[:mask.shape[0]], k[:mask.shape[0]], lengths)[:, 0]):
        return "an attn_mask that is not the causal mask of a right-padded batch", None
    return None, lengths.expand(B)
