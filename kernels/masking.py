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
import math

import torch

from .reference import attention_with_mask
from .validation import kv_heads_expanded


def bad_positions(*tensors):
    """(..., T) bool: True where a position of any of the (..., T, D) tensors holds a NaN or an
    inf. One min-and-max reduction over D each (both carry NaN, and an infinity shows in one),
    several times cheaper than an elementwise isfinite."""
    bad = None
    for t in tensors:
        b = ~(torch.isfinite(t.amax(-1)) & torch.isfinite(t.amin(-1)))  # aminmax is slower on CPUs
        bad = b if bad is None else bad | b
    return bad


def zero_positions(x, bad):
    """x (..., T, D) with the positions flagged in bad (..., T) set to 0."""
    return x.masked_fill(bad.unsqueeze(-1), 0.0)


def seen_so_far(bad):
    """(..., T) bool: some position up to and including this one is bad."""
    return bad.to(torch.uint8).cummax(-1).values.bool()


def bad_in_window(bad, Tq, left, right=0):
    """(..., Tq) bool: query i (the last Tq positions) sees a bad key within its window
    [i + Tk - Tq - left, i + Tk - Tq + right] (None: no bound on that side), from bad (..., Tk)."""
    Tk = bad.shape[-1]
    counts = torch.nn.functional.pad(bad.to(torch.int32).cumsum(-1), (1, 0))  # bad keys before j
    diagonal = torch.arange(Tq, device=bad.device) + (Tk - Tq)
    first = torch.zeros_like(diagonal) if left is None else (diagonal - left).clamp(min=0)
    last = torch.full_like(diagonal, Tk - 1) if right is None else (diagonal + right).clamp(-1, Tk - 1)
    first = torch.minimum(first, last + 1)  # a row that sees no key: an empty range
    return counts[..., last + 1] > counts[..., first]


def _all_finite(k, v):
    """Whether every entry of k and v is finite, judged by their sums (a sum that overflows
    only sends the caller down its exact path). A query's own non-finite entries need no check:
    they make its row NaN on every path, as the contract says. The test runs in Python on the
    sums' values: each tensor op on a 0-d tensor costs a CPU decode step a few us.

    Where k and v are views of one tensor not much larger than both (a fused qkv projection's
    output, as MultiHeadAttention's), that tensor is summed instead: one contiguous reduction
    instead of two strided ones, 40% less time at the small preset's shape. Its other entries
    (the queries) can only fail the test, which sends the call down the exact path."""
    base = k._base
    if (base is not None and base is v._base and base.dtype == k.dtype
            and base.numel() <= 2 * (k.numel() + v.numel())):
        return math.isfinite(base.sum().item())
    return math.isfinite(k.sum().item() + v.sum().item())


def guarded_causal(attend, q, k, v, left=None, right=0):
    """attend(q, k, v) (causal, bottom-right aligned; with `left`, a sliding window that reaches
    that many keys back; `right`, as packing.visible's: keys past the diagonal, None for all)
    keeping the contract above."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if left is None and (right is None or Tq == 1):
        # Nothing is masked (full attention; one query at the end sees every key): a non-finite
        # key or value is seen, and plain attention gives the NaN the contract asks for.
        return attend(q, k, v)
    return _guarded(attend, q, k, v, lambda bad: seen_so_far(bad)[..., Tk - Tq:]
                    if left is None and right == 0 else bad_in_window(bad, Tq, left, right))


def guarded_masked(attend, q, k, v, mask):
    """guarded_causal for any mask: attend(q, k, v) with the bool `mask` ((B or 1, 1, Tq, Tk),
    True where a query sees a key), keeping the contract above."""
    return _guarded(attend, q, k, v, lambda bad: (mask & bad.unsqueeze(-2)).any(-1))


def guarded_attention_with_mask(q, k, v, mask, scale, dropout_p=0.0, keep=None, softcap=0.0,
                                sinks=None):
    """(out, lse) of the reference's arithmetic (reference.attention_with_mask: softcap, sinks,
    a given dropout keep-mask) under a bool mask, keeping the contract above."""
    found = {}

    def attend(a, b, c):
        out, found["lse"] = attention_with_mask(a, b, c, mask, scale, dropout_p, keep, softcap,
                                                sinks)
        return out
    out = guarded_masked(attend, q, k, v, mask)
    return out, found["lse"]


def _guarded(attend, q, k, v, sees):
    """attend(q, k, v) keeping the contract; sees(bad (B, Hk, Tk)) -> (B, Hk, Tq): which query
    rows see a bad position under the caller's mask."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        # On a CPU a check costs no device sync. Without gradients, the output is checked: a
        # non-finite entry that a query should not have seen can only reach its output as NaN
        # (its weight is 0 and 0 * inf = NaN), so a finite output is the contract's output.
        # With gradients (which a finite output does not vouch for), the keys and values are:
        # when the sum of all their entries is finite (nearly always), so is every entry.
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            out = attend(q, k, v)
            if math.isfinite(out.sum().item()):
                return out
        elif _all_finite(k, v):
            return attend(q, k, v)
    bad = bad_positions(k, v)  # (B, Hk, Tk)
    # (B, H, Tq); with grouped-query heads each key/value head's flags serve its query heads.
    poisoned = kv_heads_expanded(sees(bad), q.shape[1]) | bad_positions(q)
    out = attend(q, zero_positions(k, bad), zero_positions(v, bad))
    return out.masked_fill(poisoned.unsqueeze(-1), float("nan"))
