"""Per-row key lengths and packed sequences, for the pure-PyTorch paths.

flash-attn's varlen convention: B sequences packed along one axis, x (total, H, D), with
cu_seqlens (B + 1,) int32 the cumulative lengths (sequence b holds rows cu[b] .. cu[b + 1] - 1).
The Triton kernel reads packed rows in place; the PyTorch paths either attend over the packed
rows as one sequence under a block-diagonal mask (block_diagonal_mask), or pad them into
(B, H, T, D) batches, attend with a mask (row_mask), and pack the result again. Every step is a device op
with no read back to the host, so none of it syncs.
"""
import torch


def visible(j, last, left=None, right=0):
    """True where key position j is seen by a query whose own position among the keys (its
    diagonal) is `last`: last - left <= j <= last + right, a bound of None being no bound. The
    causal mask is right = 0, a sliding window adds left, flash-attn's local attention has both,
    and right = None with left = None is full (non-causal) attention. Every mask the PyTorch
    paths build is this comparison, broadcast."""
    seen = (j <= last) | (j > last)  # all True, broadcast to the mask's shape
    if right is not None:
        seen = j <= last + right
    if left is not None:
        seen &= j >= last - left
    return seen


def row_mask(Tq, Tk, lengths, offsets, left=None, right=0):
    """(B, 1, Tq, Tk) bool, True where query i of batch entry b sees key j: j < lengths[b] and
    visible(j, i + offsets[b], left, right) (the query at position i + offsets[b] among the
    keys). lengths, offsets: (B,) integer tensors."""
    device = lengths.device
    i = torch.arange(Tq, device=device).view(1, Tq, 1)
    j = torch.arange(Tk, device=device).view(1, 1, Tk)
    return (visible(j, i + offsets.view(-1, 1, 1), left, right)
            & (j < lengths.view(-1, 1, 1))).unsqueeze(1)


def block_diagonal_mask(cu_seqlens_q, cu_seqlens_k, total_q, total_k, left=None, right=0):
    """(mask, empty) over the packed rows themselves: mask (1, 1, total_q, total_k) bool, True
    where packed query t sees packed key u, that is both belong to the same sequence b and, with
    i and j their positions in it, visible(j, i + Lk_b - Lq_b, left, right) (bottom-right
    within the sequence); empty (1, 1, total_q, 1), the queries that see no key, or False where
    the mask was built on a CPU and no query is such.

    A model's layers pass the same cu_seqlens tensors: the last few masks are kept, for those
    tensors unchanged (the same objects, not written to since: torch's version counter)."""
    compiling = torch.compiler.is_compiling()  # (traced: the mask is part of the graph)
    key = None if compiling else (id(cu_seqlens_q), cu_seqlens_q._version, id(cu_seqlens_k),
                                  cu_seqlens_k._version, total_q, total_k, left, right)
    hit = None if compiling else _BLOCK_MASKS.get(key)
    if hit is not None and hit[0] is cu_seqlens_q and hit[1] is cu_seqlens_k:
        return hit[2]
    bq, i = sequence_rows(cu_seqlens_q, total_q)  # each packed row's sequence and position
    bk, j = sequence_rows(cu_seqlens_k, total_k)
    lengths_k = seq_lengths(cu_seqlens_k)
    last = (i + (lengths_k - seq_lengths(cu_seqlens_q))[bq]).view(-1, 1)
    j = j.view(1, -1)
    seen = (bq.view(-1, 1) == bk.view(1, -1)) & visible(j, last, left, right)
    first = torch.zeros_like(last) if left is None else (last - left).clamp(min=0)
    final = lengths_k[bq].view(-1, 1) - 1
    if right is not None:
        final = torch.minimum(final, last + right)
    # A row sees no key when its first visible position is past its last one.
    empty = (first > final).view(1, 1, total_q, 1)
    if not compiling and empty.device.type == "cpu" and not bool(empty.any()):
        empty = False  # (read once per kept mask, where that costs no device sync)
    out = seen.view(1, 1, total_q, total_k), empty
    if not compiling:
        if len(_BLOCK_MASKS) >= 8:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        _BLOCK_MASKS[key] = (cu_seqlens_q, cu_seqlens_k, out)
    return out


_BLOCK_MASKS = {}  # (ids and versions of cu_seqlens, sizes, left, right) -> (the tensors, mask, empty)


def sequence_rows(cu_seqlens, total):
    """(sequence, position in it) of each of the total packed rows, two (total,) tensors."""
    t = torch.arange(total, device=cu_seqlens.device)
    b = torch.searchsorted(cu_seqlens, t, right=True) - 1
    return b, t - cu_seqlens[b]


def seq_lengths(cu_seqlens):
    """(B,) lengths of the packed sequences."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def pad(x, cu_seqlens, T):
    """Packed x (total, H, D) as a (B, H, T, D) batch, each sequence from row 0, zeros past
    its length. Differentiable (a gather)."""
    i = torch.arange(T, device=x.device)
    real = i.view(1, T) < seq_lengths(cu_seqlens).view(-1, 1)  # (B, T)
    index = (cu_seqlens[:-1].view(-1, 1) + i.view(1, T)).clamp(max=max(x.shape[0] - 1, 0))
    out = x[index]  # (B, T, H, D)
    return out.masked_fill(~real.view(*real.shape, 1, 1), 0.0).transpose(1, 2)


def unpad(x, cu_seqlens, total):
    """The inverse of pad: (B, H, T, D) -> packed (total, H, D), each packed row taken from its
    sequence's row of x (rows no sequence covers, past cu_seqlens[-1], read row 0 of the last
    sequence, or its last: the caller covers every row)."""
    b, i = sequence_rows(cu_seqlens, total)
    return x[b.clamp(0, x.shape[0] - 1), :, i.clamp(0, x.shape[2] - 1)]  # (total, H, D)


def unpad_rows(x, cu_seqlens, total):
    """unpad for row statistics: (B, H, T) -> (H, total)."""
    return unpad(x.unsqueeze(-1), cu_seqlens, total).squeeze(-1).transpose(0, 1)
