"""Context parallelism: one sequence sharded over the ranks of a process group, each rank
attending its queries to every rank's keys as they travel round a ring, the partial results
merged through their log-sum-exps in float32.

    from lecture_flash.context_parallel import ring_attention, shard, unshard
    q_local = shard(q, rank, world)                 # (B, H, T, D) -> this rank's (B, H, ~T/W, D)
    out_local = ring_attention(q_local, k_local, v_local)   # causal, zigzag-balanced
    out = unshard(gathered_outs, world)             # back to (B, H, T, D), the sequence's order

Sharding (shard/unshard): the sequence is cut into 2W chunks (torch.tensor_split's sizes, so
any length works: the first T % 2W chunks are one longer) and rank r holds chunks r and
2W - 1 - r ("zigzag"), so that under the causal mask every rank has the same work; with
zigzag=False, W chunks, rank r holding chunk r (for full attention, where work is even anyway).
Every rank's local length is exchanged once per call (one small all_gather), so uneven chunks
need nothing more.

The ring (forward): W steps; at step s a rank holds the keys and values of rank r - s, attends
its query chunks to those key chunks (a chunk before the query's: every key; the same chunk:
causal; after: none; full attention: every key), merges, and meanwhile sends what it holds to
rank r + 1 and receives from r - 1 (batch_isend_irecv, overlapping the step's compute). The
backward circulates the keys and values again (each transfer overlapping a step's compute, as
in the forward), and behind them float32 dK/dV accumulators, which arrive home complete after
the last step; dQ accumulates locally. Nothing a step saves
is a key or value of another rank (the ring re-sends them in the backward), so no stale saved
tensor can leave a gradient wrong. Dropout: each block (query chunk, key chunk) draws its mask
from a seed of its own (block_seed, from one seed the rank draws per call from torch's
generator), and its backward draws the same mask again.

exchange="allgather" gathers every shard once instead (differentiably: the keys' and values'
gradients go back summed) and attends each query chunk with causal_attention, which brings its
windows, softcap and packed documents: what a ring does badly (short windows) or lacks.

The stateless pieces, public for others to build on:
    attention_block(q, k, v, causal, scale, dropout_p=0, seed=None) -> (out, lse float32)
    attention_block_backward(do, q, k, v, out, lse, causal, scale, dq, dk, dv, dropout_p=0,
                             seed=None)   (accumulates)
    merge(out, lse, block_out, block_lse) -> (out, lse)   (float32)
    block_keep_mask(q, k, dropout_p, seed): the dropout mask a block draws for a seed

On CUDA they run the Triton kernels (the backward takes the merged out and lse, as
FlashAttention's does in a ring); elsewhere PyTorch's arithmetic, float32. Packed documents
(cu_seqlens): the all-gather variant. Not implemented, refused by name: sinks; windows,
softcap and packed documents in the ring (the all-gather variant has them).
docs/context-parallel.md has the communication and memory.
"""
import itertools

import torch
import torch.distributed as dist

from .validation import check_attention_args, kv_heads_expanded

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------

def chunk_sizes(T, world, zigzag=True):
    """The sizes of the sequence's chunks (2 * world with zigzag, else world), as
    torch.tensor_split cuts T: the first T % n are one longer."""
    n = 2 * world if zigzag else world
    return [T // n + (i < T % n) for i in range(n)]


def rank_chunks(rank, world, zigzag=True):
    """The chunk indices rank holds, in the order its shard stores them."""
    return (rank, 2 * world - 1 - rank) if zigzag else (rank,)


def shard(x, rank, world, dim=2, zigzag=True):
    """This rank's part of x along dim (the sequence: 2 for (B, H, T, D), 1 for (B, T, H, D))."""
    chunks = torch.tensor_split(x, 2 * world if zigzag else world, dim=dim)
    return torch.cat([chunks[c] for c in rank_chunks(rank, world, zigzag)], dim=dim)


def unshard(parts, world, dim=2, zigzag=True):
    """The sequence in order again from every rank's shard (parts[r]: rank r's)."""
    pieces = {}
    for r, part in enumerate(parts):
        cs = rank_chunks(r, world, zigzag)
        if len(cs) == 1:
            pieces[cs[0]] = part
            continue
        T = sum(p.shape[dim] for p in parts)
        sizes = chunk_sizes(T, world, zigzag)
        pieces[cs[0]], pieces[cs[1]] = part.split([sizes[cs[0]], sizes[cs[1]]], dim=dim)
    return torch.cat([pieces[c] for c in sorted(pieces)], dim=dim)


# ----------------------------------------------------------------------------------------------
# The stateless pieces
# ----------------------------------------------------------------------------------------------

# Which arithmetic the stateless pieces use: "auto" (the Triton kernels on CUDA, PyTorch's
# elsewhere), "triton" (also under the CPU interpreter: tests), or "torch".
BACKEND = "auto"


def _triton_runs(q, scale=1.0):
    from . import dispatch
    if BACKEND == "torch" or scale <= 0:  # (the kernels' backward takes scale > 0)
        return False
    if BACKEND == "triton":
        return True
    return q.device.type == "cuda" and dispatch._triton_unavailable(q) is None


def block_keep_mask(q, k, dropout_p, seed):
    """The keep mask (True: kept) that a block of q (B, H, m, D) against k (B, Hk, n, D) draws
    for dropout with this seed (an int), (B, H, m, n) bool: the Triton kernels' draw where they
    run the block, else torch.rand's from a generator seeded with it. The same seed gives the
    same mask, so a block's backward drops what its forward dropped."""
    B, H, m, _ = q.shape
    n = k.shape[2]
    if _triton_runs(q):
        from . import flash
        return flash.dropout_keep_mask(_seed_tensor(seed, q.device), B, H, m, n, dropout_p)
    g = torch.Generator(device=q.device).manual_seed(seed)
    return torch.rand((B, H, m, n), generator=g, device=q.device) >= dropout_p


def _seed_tensor(seed, device):
    return torch.tensor([seed], dtype=torch.int64, device=device)


def attention_block(q, k, v, causal, scale, dropout_p=0.0, seed=None):
    """(out, lse) of one block, no autograd: q (B, H, m, D), k and v (B, Hk, n, D); causal: the
    mask bottom-right aligned (m == n for a ring's diagonal block), else every key. out in q's
    dtype, lse (B, H, m) float32, natural log. dropout_p, seed (an int): dropout of the block's
    weights with the mask block_keep_mask draws for that seed; lse stays the undropped scores'
    (so blocks merge as without dropout, FlashAttention's convention)."""
    from .dispatch import causal_attention
    with torch.no_grad():
        if dropout_p > 0.0:
            if _triton_runs(q, scale):
                from . import flash
                out, lse = flash._fwd_impl(q, k, v, _seed_tensor(seed, q.device), float(scale),
                                           float(dropout_p), flash._precision(q), -1,
                                           keep_lse=True, right=0 if causal else -1)
                return out, (lse * flash.LN2).float()
            from .reference import causal_attention_reference
            out, lse = causal_attention_reference(
                q, k, v, scale=scale, causal=causal, return_lse=True, dropout_p=dropout_p,
                dropout_mask=block_keep_mask(q, k, dropout_p, seed))
            return out, lse.float()
        backend = "triton" if _triton_runs(q, scale) else "reference"
        out, lse = causal_attention(q, k, v, scale=scale, causal=causal, return_lse=True,
                                    backend=backend)
    return out, lse.float()


def merge(out, lse, block_out, block_lse):
    """The attention over two key sets from each one's (out, lse): float32 out and lse, weights
    exp(lse_part - lse). out None: the first part."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    new_safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w_old = torch.exp(lse - new_safe).unsqueeze(-1)
    w_new = torch.exp(block_lse - new_safe).unsqueeze(-1)
    return out * w_old + block_out * w_new, new


def attention_block_backward(do, q, k, v, out, lse, causal, scale, dq, dk, dv, dropout_p=0.0,
                             seed=None):
    """Add one block's share of the gradients to the float32 buffers dq (B, H, m, D), dk and dv
    (B, Hk, n, D), given the output and lse merged over every block (the softmax is the whole
    row's: P = exp(S - lse), delta = rowsum(dO * O)). dropout_p, seed: the forward's (the same
    mask is drawn again: dV takes the dropped weights, dS = P (Z dO V^T - delta), Z the mask
    over 1 - p)."""
    if _triton_runs(q, scale):
        from . import flash_launch
        seed_t = _seed_tensor(seed, q.device) if dropout_p > 0.0 else None
        bq, bk, bv = flash_launch.backward(do.to(q.dtype).contiguous(), q, k, v,
                                           out.to(q.dtype).contiguous(),
                                           (lse * LOG2E).contiguous(), seed_t, float(scale),
                                           float(dropout_p), "ieee", True,
                                           right=0 if causal else -1)
        dq += bq.float()
        dk += bk.float()
        dv += bv.float()
        return
    H, Hk = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), kv_heads_expanded(k, H).float(), kv_heads_expanded(v, H).float()
    s = (qf @ kf.transpose(-2, -1)) * scale
    if causal:
        m, n = q.shape[2], k.shape[2]
        i = torch.arange(m, device=q.device).view(-1, 1) + (n - m)
        s = s.masked_fill(torch.arange(n, device=q.device).view(1, -1) > i, float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))
    dof = do.float()
    delta = (dof * out.float()).sum(-1, keepdim=True)
    dp = dof @ vf.transpose(-2, -1)  # the gradient of the (dropped) weights
    kept = p
    if dropout_p > 0.0:
        z = block_keep_mask(q, k, dropout_p, seed).float() / (1.0 - dropout_p)
        dp, kept = dp * z, p * z
    ds = p * (dp - delta) * scale
    dq += ds @ kf
    group = H // Hk
    dk += (ds.transpose(-2, -1) @ qf).unflatten(1, (Hk, group)).sum(2)
    dv += (kept.transpose(-2, -1) @ dof).unflatten(1, (Hk, group)).sum(2)


# ----------------------------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------------------------

class _Ring:
    """One call's layout: the group, every rank's chunks and their sizes, where each of this
    rank's chunks sits in its shard."""

    def __init__(self, q, group, zigzag):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        local = torch.tensor([q.shape[2]], device=q.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=group)
        T = int(sum(int(x) for x in gathered))
        self.sizes = chunk_sizes(T, self.world, zigzag)
        self.zigzag = zigzag
        expected = [sum(self.sizes[c] for c in rank_chunks(r, self.world, zigzag))
                    for r in range(self.world)]
        if [int(x) for x in gathered] != expected:
            raise ValueError(f"the ranks' local lengths {[int(x) for x in gathered]} are not "
                             f"lecture_flash.context_parallel.shard's of {T} positions over "
                             f"{self.world} ranks ({expected})")
        self.peers = [dist.get_global_rank(group, r) if group is not None else r
                      for r in range(self.world)]

    def chunks(self, rank):
        """[(chunk index, start in the shard, length)] of rank's shard."""
        found, start = [], 0
        for c in rank_chunks(rank, self.world, self.zigzag):
            found.append((c, start, self.sizes[c]))
            start += self.sizes[c]
        return found

    def shape_of(self, rank, like):
        n = sum(size for _, _, size in self.chunks(rank))
        return (*like.shape[:2], n, like.shape[3])

    def exchange(self, tensors, step):
        """Start sending `tensors` to the next rank and receiving the previous rank's (which
        hold rank r - step - 1's): returns (requests, receive buffers)."""
        source = (self.rank - step - 1) % self.world
        bufs = [t.new_empty(self.shape_of(source, t)) for t in tensors]
        nxt, prev = self.peers[(self.rank + 1) % self.world], self.peers[(self.rank - 1) % self.world]
        ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, prev, self.group) for b in bufs]
        return dist.batch_isend_irecv(ops), bufs

    def pairs(self, source, causal):
        """[(q start, q length, k start, k length, causal, block)] of the blocks this rank's
        queries attend in the keys of `source`'s shard; block: the (query chunk, key chunk)
        indices, which name the block's dropout seed."""
        found = []
        for qc, qs, qn in self.chunks(self.rank):
            for kc, ks, kn in self.chunks(source):
                if qn == 0 or kn == 0 or (causal and kc > qc):
                    continue
                found.append((qs, qn, ks, kn, causal and kc == qc, (qc, kc)))
        return found


def block_seed(base, block, n_chunks):
    """The dropout seed of block (query chunk, key chunk) of a call whose rank drew `base`: one
    per block, so that blocks draw independent masks, and the backward the forward's again."""
    qc, kc = block
    return (base + 104729 * (qc * n_chunks + kc + 1)) % (2**31 - 1)


def draw_base_seed():
    """A ring call's dropout seed, drawn from torch's CPU generator (so torch.manual_seed replays
    it, and a checkpoint's random state resumes it), without a device sync."""
    return int(torch.randint(0, 2**31 - 1, (1,)))


def _forward(ring, q, k, v, causal, scale, dropout_p=0.0, base=None):
    out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=torch.float32)
    held = (k, v)
    for step in range(ring.world):
        source = (ring.rank - step) % ring.world
        pending = ring.exchange(held, step) if step < ring.world - 1 else None
        for qs, qn, ks, kn, diag, block in ring.pairs(source, causal):
            seed = block_seed(base, block, len(ring.sizes)) if dropout_p > 0.0 else None
            o, l = attention_block(q[:, :, qs:qs + qn], held[0][:, :, ks:ks + kn],
                                   held[1][:, :, ks:ks + kn], diag, scale, dropout_p, seed)
            rows = slice(qs, qs + qn)
            out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], o, l)
        if pending is not None:
            for request in pending[0]:
                request.wait()
            held = tuple(pending[1])
    return out, lse


def _backward(ring, do, q, k, v, out, lse, causal, scale, dropout_p=0.0, base=None):
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    held, grads = (k, v), (dk, dv)
    for step in range(ring.world):
        source = (ring.rank - step) % ring.world
        # The keys and values for the next step travel while this step computes (as in the
        # forward); their gradients' accumulators move on once this step has added to them, and
        # after the last step they are home. (Every rank posts the two exchanges in this order,
        # so the sends and receives pair up.)
        pending = ring.exchange(held, step) if step < ring.world - 1 else None
        (kk, vv), (gk, gv) = held, grads
        for qs, qn, ks, kn, diag, block in ring.pairs(source, causal):
            rows, keys = slice(qs, qs + qn), slice(ks, ks + kn)
            seed = block_seed(base, block, len(ring.sizes)) if dropout_p > 0.0 else None
            # (the buffers' slices are views: each block adds into them in place)
            attention_block_backward(do[:, :, rows], q[:, :, rows], kk[:, :, keys],
                                     vv[:, :, keys], out[:, :, rows], lse[:, :, rows], diag,
                                     scale, dq[:, :, rows], gk[:, :, keys], gv[:, :, keys],
                                     dropout_p, seed)
        requests, bufs = ring.exchange(grads, step)
        for request in requests:
            request.wait()
        grads = tuple(bufs)
        if pending is not None:
            for request in pending[0]:
                request.wait()
            held = tuple(pending[1])
    return dq, grads[0], grads[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, zigzag, dropout_p):
        ring = _Ring(q, group, zigzag)
        base = draw_base_seed() if dropout_p > 0.0 else None
        out, lse = _forward(ring, q, k, v, causal, scale, dropout_p, base)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.dropout = ring, causal, scale, (dropout_p, base)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.ring, do, q, k, v, out, lse, ctx.causal, ctx.scale,
                               *ctx.dropout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


class _GatherShards(torch.autograd.Function):
    """Every rank's (B, Hk, T_r, D) shard, padded to the longest: forward all_gather; backward
    each rank's share of the gradients summed over the ranks (reduce_scatter on NCCL; gloo has
    none, so an all_reduce of them all there)."""

    @staticmethod
    def forward(ctx, x, longest, group):
        ctx.group, ctx.n = group, x.shape[2]
        padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[2])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, padded, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        else:
            dist.all_reduce(grad, group=ctx.group)
            mine = grad[rank]
        return mine[:, :, :ctx.n], None, None


def _gathered(ring, k, v):
    """Every rank's (B, Hk, T_r, D) keys and values gathered once (differentiably: the
    gradients go back summed) and put in the sequence's order, (B, Hk, T, D) each; and where
    each chunk starts in the sequence."""
    lengths = [sum(n for _, _, n in ring.chunks(r)) for r in range(ring.world)]
    longest = max(lengths)
    gathered = [_GatherShards.apply(x, longest, ring.group) for x in (k, v)]  # (W, B, Hk, L, D)
    k_all, v_all = (unshard([g[r][:, :, :lengths[r]] for r in range(ring.world)], ring.world,
                            zigzag=ring.zigzag) for g in gathered)
    return k_all, v_all, [sum(ring.sizes[:c]) for c in range(len(ring.sizes))]


def _gathered_attention(ring, q, k, v, causal, scale, window, dropout_p, softcap):
    """The all-gather variant: every rank's keys and values gathered once, and each of this
    rank's query chunks attended by causal_attention to the keys up to its end (causal:
    bottom-right, windows and dropout as causal_attention has them) or to all of them (full
    attention)."""
    from .dispatch import causal_attention
    k_all, v_all, starts = _gathered(ring, k, v)
    outs = []
    for c, qs, qn in ring.chunks(ring.rank):
        if qn == 0:
            continue
        end = starts[c] + qn if causal else k_all.shape[2]
        outs.append(causal_attention(q[:, :, qs:qs + qn], k_all[:, :, :end], v_all[:, :, :end],
                                     scale=scale, causal=causal, window=window,
                                     dropout_p=dropout_p, softcap=softcap))
    return torch.cat(outs, dim=2)


def _gathered_documents(ring, q, k, v, cu, causal, scale, window, dropout_p, softcap):
    """The all-gather variant for packed documents: q (T_r, H, D), k, v (T_r, Hk, D), this
    rank's shard of the packed stream, cu the whole stream's document boundaries (a list).
    Each query chunk (a run of the stream) attends, document by document, as causal_attention's
    packed rows: the part of each document it holds, to that document's keys up to the chunk's
    end (causal, bottom-right: the same positions) or all of them (full attention)."""
    from .dispatch import causal_attention
    k_all, v_all, starts = _gathered(ring, *(x.transpose(0, 1).unsqueeze(0) for x in (k, v)))
    k_all, v_all = (x[0].transpose(0, 1) for x in (k_all, v_all))  # (T, Hk, D)
    outs = []
    for c, qs, qn in ring.chunks(ring.rank):
        if qn == 0:
            continue
        a, b = starts[c], starts[c] + qn  # the chunk's positions in the stream
        docs = [(s, e) for s, e in zip(cu[:-1], cu[1:]) if s < b and e > a]  # those it meets
        lq = [min(b, e) - max(a, s) for s, e in docs]  # the part of each the chunk holds
        keys = [(s, min(b, e) if causal else e) for s, e in docs]  # and the keys it sees
        lk = [ke - ks for ks, ke in keys]
        cu_q, cu_k = (torch.tensor(list(itertools.accumulate(n, initial=0)), device=q.device,
                                   dtype=torch.int32) for n in (lq, lk))
        outs.append(causal_attention(q[qs:qs + qn], *(torch.cat([x[ks:ke] for ks, ke in keys])
                                                      for x in (k_all, v_all)),
                                     scale=scale, causal=causal, window=window,
                                     dropout_p=dropout_p, softcap=softcap, cu_seqlens_q=cu_q,
                                     cu_seqlens_k=cu_k, max_seqlen_q=max(lq),
                                     max_seqlen_k=max(lk)))
    return torch.cat(outs, dim=0)


def _document_bounds(cu_seqlens, T):
    """cu_seqlens read on the host as a list, checked: integers from 0 to the whole stream's
    T positions, non-decreasing."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or (
            cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool):
        raise TypeError("cu_seqlens must be a 1-D integer tensor of the documents' boundaries")
    cu = cu_seqlens.tolist()
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must run from 0 to the whole stream's {T} positions, "
                         f"non-decreasing, got {cu}")
    return cu


def ring_attention(q, k, v, *, group=None, causal=True, scale=None, layout="bhtd", zigzag=None,
                   dropout_p=0.0, window=None, softcap=0.0, sinks=None, exchange="ring",
                   cu_seqlens=None):
    """Attention of a sequence sharded over `group` (default: the whole world), each rank
    passing its own shard: q (B, H, T_r, D), k and v (B, Hk, T_r, D) (layout "bthd": (B, T_r,
    H, D)), as shard() cuts them: zigzag (None: True for causal attention, False for full)
    must be what shard() was given. Returns this rank's part of the output, in q's dtype and
    layout.
    Differentiable: the backward runs the ring again. Every rank must call it with the same
    options.

    causal: the whole sequence's causal mask (query i sees keys j <= i, in global positions);
    False: every key. scale: multiplier of q @ k^T (default D ** -0.5). Grouped-query heads as
    causal_attention takes them. Partial outputs merge in float32 whatever the inputs' dtype.
    dropout_p: dropout of the attention weights, as causal_attention's; each rank draws its own
    masks (one seed per call from torch's generator, one per block from it), so a run's draws
    differ from one process's (the same distribution).

    exchange: "ring" (the default: keys and values travel round the ranks, each step's transfer
    overlapping the previous step's compute; memory per rank stays one shard) or "allgather"
    (every rank gathers every shard once, then attends its query chunks with causal_attention;
    the gradients of the keys and values go back summed; memory per rank holds the whole
    sequence's keys and values): what a ring does badly, short windows (most ring steps see
    nothing) and the options the ring lacks. window, softcap: with exchange="allgather" only,
    as causal_attention takes them (causal; full attention without a window). sinks: not
    implemented (NotImplementedError).

    cu_seqlens: packed documents (exchange="allgather" only): q (T_r, H, D), k and v (T_r, Hk,
    D), this rank's shard of a stream of documents packed one after another (shard(x, rank,
    world, dim=0)), and cu_seqlens (n + 1,) the whole stream's document boundaries from 0 to T,
    the same on every rank (read on the host once per call). No query sees another document;
    within its own, the mask above (causal_attention's packed rows)."""
    if exchange not in ("ring", "allgather"):
        raise ValueError(f"exchange must be 'ring' or 'allgather', got {exchange!r}")
    if sinks is not None:
        raise NotImplementedError("ring_attention: sinks is not implemented (pass sinks=None)")
    if exchange == "ring":
        for name, given, none in (("window", window, None), ("softcap", softcap, 0.0)):
            if given != none:
                raise NotImplementedError(
                    f"ring_attention: {name} is not implemented by the ring (pass {name}={none!r}, "
                    "or exchange='allgather', which takes it)")
    if window is not None and not causal:
        raise NotImplementedError("ring_attention: a window with causal=False is not implemented")
    if cu_seqlens is not None and exchange != "allgather":
        raise NotImplementedError("ring_attention: packed documents (cu_seqlens) are not "
                                  "implemented by the ring; pass exchange='allgather'")
    if layout not in ("bhtd", "bthd") or (layout == "bthd" and cu_seqlens is not None):
        raise ValueError(f"layout must be 'bhtd' or 'bthd' (packed documents, cu_seqlens: 'bhtd', "
                         f"their one layout (T_r, H, D)), got {layout!r}")
    if layout == "bthd":
        out = ring_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=group,
                             causal=causal, scale=scale, zigzag=zigzag, dropout_p=dropout_p,
                             window=window, softcap=softcap, exchange=exchange)
        return out.transpose(1, 2)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, or torchrun)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    zigzag = causal if zigzag is None else bool(zigzag)
    if cu_seqlens is not None:
        if not (q.dim() == k.dim() == v.dim() == 3 and q.shape[0] == k.shape[0]
                and k.shape == v.shape and q.shape[2] == k.shape[2]):
            raise ValueError("with cu_seqlens, q, k and v are this rank's (T_r, heads, D) shard "
                             f"of the packed stream, got {tuple(q.shape)}, {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")  # (causal_attention checks the rest)
        ring = _Ring(q.transpose(0, 1).unsqueeze(0), group, zigzag)
        cu = _document_bounds(cu_seqlens, sum(ring.sizes))
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return _gathered_documents(ring, q, k, v, cu, causal, scale, window, dropout_p, softcap)
    q4, k4, v4, three_d = check_attention_args(q, k, v, scale, dropout_p, full=True)
    if three_d:
        raise ValueError("ring_attention takes 4-D (B, H, T, D) shards")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same positions of the sequence (self-attention "
                         f"shards), got {q.shape[2]} and {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if exchange == "allgather":
        return _gathered_attention(_Ring(q, group, zigzag), q, k, v, causal, scale, window,
                                   dropout_p, softcap)
    return _RingAttention.apply(q, k, v, causal, scale, group, zigzag, float(dropout_p))
