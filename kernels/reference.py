"""The pure-PyTorch oracle: explicit masked softmax, in float32 (float64 for float64 inputs).

Every other backend is tested against this function. It is written for clarity, not speed: it
materialises the whole (Tq, Tk) score matrix.
"""
import torch

from .packing import pad, row_mask, seq_lengths, unpad, unpad_rows, visible
from .validation import (check_attention_args, check_packed_args, check_seqlens_k, check_sinks,
                         check_softcap, check_window, kv_heads_expanded)


def causal_mask(Tq, Tk, device=None, left=None, right=0):
    """(Tq, Tk) bool mask, True where query i may see key j, aligned bottom-right.

    Query i sits at absolute position i + (Tk - Tq), so it sees keys j <= i + Tk - Tq. With
    Tq == Tk this is the usual lower triangle; with Tq < Tk it is what a KV cache needs. left,
    right: the window's reach on either side of that position (packing.visible; right=None and
    left=None: every key).
    """
    i = torch.arange(Tq, device=device).unsqueeze(1)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    return visible(j, i + (Tk - Tq), left, right)


def masked_scores(q, k, scale, left=None, mask=None, softcap=0.0, right=0):
    """(..., Tq, Tk) scaled scores q k^T (softcapped: softcap * tanh(score / softcap)), -inf
    where the causal mask (or `mask`, True where a query sees a key) hides a key (a NaN there
    included), in q's dtype; q and k with their heads already matched."""
    s = (q @ k.transpose(-2, -1)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device, left, right)
    return s.masked_fill(~mask, float("-inf"))


def key_length_mask(q, k, seqlens_k, left=None, cache=False, right=0):
    """The (B, 1, Tq, Tk) mask of q, k (4-D) with per-row key lengths seqlens_k (clamped to
    [0, Tk]): the mask as without them (cache: with the queries the last Tq positions of each
    row's keys instead), keys past a row's length hidden."""
    Tq, Tk = q.shape[2], k.shape[2]
    lengths = seqlens_k.clamp(0, Tk)
    return row_mask(Tq, Tk, lengths, (lengths if cache else torch.full_like(lengths, Tk)) - Tq,
                    left, right)


def packed_mask(cu_seqlens_q, cu_seqlens_k, Tq, Tk, left=None, right=0):
    """The (B, 1, Tq, Tk) mask of packed sequences padded to Tq, Tk rows: bottom-right within
    each sequence, keys past its length hidden."""
    Lq, Lk = seq_lengths(cu_seqlens_q), seq_lengths(cu_seqlens_k)
    return row_mask(Tq, Tk, Lk, Lk - Lq, left, right)


def causal_attention_reference(q, k, v, *, scale=None, dropout_p=0.0, dropout_mask=None,
                               return_lse=False, window=None, seqlens_k=None, cu_seqlens_q=None,
                               cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               causal=True, softcap=0.0, sinks=None):
    """Attention computed the plain way, as the lecture does, for all heads at once.

    q: (B, H, Tq, D) or (N, Tq, D); k, v: (B, Hk, Tk, D) or (N, Tk, D), Tq <= Tk (any with full
    attention), Hk dividing H (grouped-query attention: query head h sees key/value head
    h // (H // Hk)).
    causal, window: the mask, aligned bottom-right (query i at position i + Tk - Tq among the
    keys). causal=True: keys up to that position; window (left, right), -1 for no bound
    (flash-attn's): keys from that position - left to that position + right (causal: right 0);
    causal=False without a window: every key.
    softcap: > 0: scores become softcap * tanh(score / softcap) (Gemma 2) before the mask.
    sinks: None, or (H,) one logit per query head that joins every row's softmax denominator
    (gpt-oss, StreamingLLM): weights exp(s_j - lse) with lse = log(exp(sink) + sum_j exp(s_j)).
    seqlens_k: (B,) integers: row b's keys from seqlens_k[b] on are hidden (the mask otherwise
    unchanged). cu_seqlens_q, cu_seqlens_k (B + 1,), max_seqlen_q, max_seqlen_k: packed
    sequences instead (q (total_q, H, D), k and v (total_k, Hk, D)), the mask bottom-right
    within each. A query that sees no key gives zeros (and a log-sum-exp of -inf, or its sink).
    dropout_mask: optional bool tensor broadcastable to (B, H, Tq, Tk) (packed: the padded
    (B, H, max_seqlen_q, max_seqlen_k)), True = keep. When given, it replaces a random draw, so
    a test can feed the oracle the very mask a kernel used.
    Returns a tensor of q's shape and dtype; with return_lse, also each row's log-sum-exp of
    its scaled, masked scores (the sink's term included) ((B, H, Tq), (N, Tq) or packed
    (H, total_q), natural log, float32; float64 for float64 inputs).
    """
    left, right = check_window(window, causal)
    softcap = check_softcap(softcap)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        cu_q, cu_k, Tq, Tk = check_packed_args(q, k, v, scale, dropout_p, cu_seqlens_q,
                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        sinks = check_sinks(sinks, q.shape[1], q.device)
        mask = packed_mask(cu_q, cu_k, Tq, Tk, left, right)
        out, lse = attention_with_mask(pad(q, cu_q, Tq), pad(k, cu_k, Tk), pad(v, cu_k, Tk), mask,
                                       scale, dropout_p, dropout_mask, softcap, sinks)
        out, lse = unpad(out, cu_q, q.shape[0]), unpad_rows(lse, cu_q, q.shape[0])
        return (out, lse) if return_lse else out
    q4, k4, v4, three_d = check_attention_args(q, k, v, scale, dropout_p,
                                               full=left is None and right is None)
    sinks = check_sinks(sinks, q4.shape[1], q4.device)
    if seqlens_k is not None:
        mask = key_length_mask(q4, k4, check_seqlens_k(seqlens_k, q4, k4), left, right=right)
    else:
        mask = causal_mask(q4.shape[2], k4.shape[2], q4.device, left, right)
    out, lse = attention_with_mask(q4, k4, v4, mask, scale, dropout_p, dropout_mask, softcap, sinks)
    if three_d:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def attention_with_mask(q, k, v, mask, scale=None, dropout_p=0.0, dropout_mask=None, softcap=0.0,
                        sinks=None):
    """(out, lse) of 4-D q, k, v (grouped-query heads allowed) under a bool mask broadcastable
    to (B, H, Tq, Tk), True where a query sees a key, computed in float32 (float64 for float64
    inputs): the oracle's arithmetic. softcap, sinks: as causal_attention_reference's. A row
    that sees no key gives zeros and lse -inf (its sink with sinks)."""
    k, v = kv_heads_expanded(k, q.shape[1]), kv_heads_expanded(v, q.shape[1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = masked_scores(q.to(compute), k.to(compute), scale, mask=mask,
                           softcap=softcap)  # (B, H, Tq, Tk)
    if sinks is not None:
        probs, lse = softmax_with_sinks(scores, sinks.to(compute))
    else:
        probs, lse = softmax_and_lse(scores, mask)
    if dropout_mask is not None:
        if dropout_p == 0.0:
            raise ValueError("dropout_mask was given but dropout_p is 0; pass the p it was drawn with")
        probs = probs * dropout_mask.to(compute) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return (probs @ v.to(compute)).to(q.dtype), lse


def softmax_and_lse(scores, mask):
    """softmax(scores) and logsumexp(scores) along the keys, where a row that sees no key under
    `mask` gets weights 0 and lse -inf, and no NaN in any gradient (its scores are replaced by
    zeros before either is taken)."""
    empty = ~mask.any(-1, keepdim=True)
    safe = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(safe, dim=-1).masked_fill(empty, 0.0)
    return probs, _lse(safe, empty)


def softmax_with_sinks(scores, sinks):
    """softmax and logsumexp of (B, H, Tq, Tk) scores along the keys with each head's sink
    logit (sinks (H,)) joining the denominator as one more key whose value is zero. The sink is
    finite, so a row that sees no key gets weights 0 and lse = its sink, without NaN."""
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def masked_lse(scores, mask):
    """The log-sum-exp half of softmax_and_lse, alone."""
    empty = ~mask.any(-1, keepdim=True)
    return _lse(scores.masked_fill(empty, 0.0), empty)


def _lse(safe, empty):
    return torch.logsumexp(safe, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))


def naive_causal_attention(q, k, v, scale=None, dropout_p=0.0, dropout_mask=None, window=None,
                           mask=None):
    """Batched explicit masked softmax with every op in the inputs' own dtype, no validation.

    This is what a user writes by hand (and PyTorch's math path computes): the low-precision
    baseline of the tolerance rule, and "naive-batched" in the benchmark. mask: a bool mask
    (True where a query sees a key) in place of the causal one; rows that see no key give 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dim() == 4:  # grouped-query: each key/value head serves H // Hk query heads
        k, v = kv_heads_expanded(k, q.shape[1]), kv_heads_expanded(v, q.shape[1])
    if mask is None:
        p = torch.softmax(masked_scores(q, k, scale, None if window is None else window[0]), dim=-1)
    else:
        p = softmax_and_lse(masked_scores(q, k, scale, mask=mask), mask)[0]
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1 - dropout_p)
    return p @ v


def naive_packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, dropout_p=0.0,
                           dropout_mask=None, window=None):
    """naive_causal_attention of packed sequences (causal_attention's cu_seqlens convention):
    padded into a batch, masked, packed again. Reads the longest lengths on the host."""
    Tq, Tk = (int(seq_lengths(cu).max()) for cu in (cu_seqlens_q, cu_seqlens_k))
    mask = packed_mask(cu_seqlens_q, cu_seqlens_k, Tq, Tk, None if window is None else window[0])
    out = naive_causal_attention(pad(q, cu_seqlens_q, Tq), pad(k, cu_seqlens_k, Tk),
                                 pad(v, cu_seqlens_k, Tk), scale, dropout_p, dropout_mask,
                                 mask=mask)
    return unpad(out, cu_seqlens_q, q.shape[0])
