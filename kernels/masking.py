"""Masked positions never influence the output, on the pure-PyTorch backends.

A plain masked softmax multiplies every value by its weight, masked ones included, and
0 * NaN = NaN: a NaN or inf in a key or value a query cannot see (a future position, an empty
cache slot) would reach that query's output anyway (PyTorch's own SDPA does this). The contract
every backend keeps (the Triton kernel inside its tiles, these backends here):

- a query that cannot see a non-finite key or value computes exactly as if it were finite;
- a query that sees one (or whose own entries are not finite) gets NaN; only an infinite key
  may instead weigh 0 for a query, as plain math gives where its score is -inf (the Triton
  kernel computes the scores of the keys a query sees as they are).

Both are cheap to keep in PyTorch: the positions whose key or value holds a non-finite entry
are zeroed before attending, and a query's output is set to NaN where the running "some key so
far was bad" flag (a cumulative max along the keys) is set at the last key it sees.
"""
import torch


def bad_positions(k, v):
    """(..., T) bool: True where a key or value position holds a NaN or an inf."""
    return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def zero_positions(x, bad):
    """x (..., T, D) with the positions flagged in bad (..., T) set to 0."""
    return x.masked_fill(bad.unsqueeze(-1), 0.0)


def seen_so_far(bad):
    """(..., T) bool: some position up to and including this one is bad."""
    return bad.to(torch.uint8).cummax(-1).values.bool()


def guarded_causal(attend, q, k, v):
    """attend(q, k, v) (causal, bottom-right aligned) keeping the contract above."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    bad = bad_positions(k, v)  # (B, H, Tk)
    poisoned = seen_so_far(bad)[..., Tk - Tq:] | ~torch.isfinite(q).all(-1)  # (B, H, Tq)
    out = attend(q, zero_positions(k, bad), zero_positions(v, bad))
    return out.masked_fill(poisoned.unsqueeze(-1), float("nan"))
