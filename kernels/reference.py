"""The pure-PyTorch oracle: explicit masked softmax, in float32 (float64 for float64 inputs).

Every other backend is tested against this function. It is written for clarity, not speed: it
materialises the whole (Tq, Tk) score matrix.
"""
import torch

from .validation import check_attention_args, check_window, kv_heads_expanded


def causal_mask(Tq, Tk, device=None, left=None):
    """(Tq, Tk) bool mask, True where query i may see key j, aligned bottom-right.

    Query i sits at absolute position i + (Tk - Tq), so it sees keys j <= i + Tk - Tq. With
    Tq == Tk this is the usual lower triangle; with Tq < Tk it is what a KV cache needs.
    """
    i = torch.arange(Tq, device=device).unsqueeze(1)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    seen = j <= i + (Tk - Tq)
    if left is not None:  # a sliding window: the key at most `left` positions back, too
        seen &= j >= i + (Tk - Tq) - left
    return seen


def masked_scores(q, k, scale, left=None):
    """(..., Tq, Tk) scaled scores q k^T, -inf where the causal mask hides a key (a NaN there
    included), in q's dtype; q and k with their heads already matched."""
    s = (q @ k.transpose(-2, -1)) * scale
    return s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device, left), float("-inf"))


def causal_attention_reference(q, k, v, *, scale=None, dropout_p=0.0, dropout_mask=None,
                               return_lse=False, window=None):
    """Causal attention computed the plain way, as the lecture does, for all heads at once.

    q: (B, H, Tq, D) or (N, Tq, D); k, v: (B, Hk, Tk, D) or (N, Tk, D), Tq <= Tk, Hk dividing H
    (grouped-query attention: query head h sees key/value head h // (H // Hk)).
    window: None, or (left, 0): query i also sees no key before i + (Tk - Tq) - left.
    dropout_mask: optional bool tensor broadcastable to (B, H, Tq, Tk), True = keep. When given,
    it replaces a random draw, so a test can feed the oracle the very mask a kernel used.
    Returns a tensor of q's shape and dtype; with return_lse, also each row's log-sum-exp of
    its scaled, masked scores ((B, H, Tq) or (N, Tq), natural log, float32; float64 for float64
    inputs).
    """
    q4, k4, v4, three_d = check_attention_args(q, k, v, scale, dropout_p)
    left = check_window(window)
    k4, v4 = kv_heads_expanded(k4, q4.shape[1]), kv_heads_expanded(v4, q4.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q4.shape[-1] ** -0.5 if scale is None else scale
    scores = masked_scores(q4.to(compute), k4.to(compute), scale, left)  # (B, H, Tq, Tk)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        if dropout_p == 0.0:
            raise ValueError("dropout_mask was given but dropout_p is 0; pass the p it was drawn with")
        probs = probs * dropout_mask.to(compute) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = (probs @ v4.to(compute)).to(q.dtype)  # (B, H, Tq, D)
    if three_d:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def naive_causal_attention(q, k, v, scale=None, dropout_p=0.0, dropout_mask=None, window=None):
    """Batched explicit masked softmax with every op in the inputs' own dtype, no validation.

    This is what a user writes by hand (and PyTorch's math path computes): the low-precision
    baseline of the tolerance rule, and "naive-batched" in the benchmark.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dim() == 4:  # grouped-query: each key/value head serves H // Hk query heads
        k, v = kv_heads_expanded(k, q.shape[1]), kv_heads_expanded(v, q.shape[1])
    p = torch.softmax(masked_scores(q, k, scale, None if window is None else window[0]), dim=-1)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1 - dropout_p)
    return p @ v
