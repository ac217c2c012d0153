"""The forward kernel: FlashAttention-2's algorithm, causal by default, one program per BLOCK_M query rows
of one head (the tutorial's shape; the shared pieces are in flash_tiles.py).

Stream K/V tiles past the Q tile, keep a running max m and running sum l in float32 (online
softmax), in base 2 with log2(e) folded into the scale. Key tiles wholly below the diagonal run
unmasked; only the tiles the diagonal crosses are masked; tiles above it are never loaded. A
sliding window (WINDOW, LEFT: query i sees keys i + offset - LEFT .. i + offset) adds a masked
stage for the tiles its left edge crosses, and the tiles left of every row's window are never
loaded either. A window's right side, or full attention, moves the diagonal right (RIGHT,
SHIFT); softcapping (SOFTCAP) maps each raw score through tanh before anything else reads it;
attention sinks (HAS_SINKS) start each row's running max and sum at the head's sink logit.
Writes O and the row log-sum-exp for the backward (float32, in base 2: log2(e) times the
natural one). With SPLIT (flash-decoding, flash_decode.py) each program takes one
range of the keys.
"""
import triton
import triton.language as tl

from .flash_tiles import (_NO_SPECIALIZE, _batch_and_head, _capped, _dot, _exp2_weights, _finite,
                          _head,
                          _keep, _key_stages, _load_operand, _offsets, _row_max, _row_stats, _slab,
                          _store_tile, _tf32_rounded, _to, _visible)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k, v, offs_m, offs_d, lo, hi, head, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """Fold key tiles [lo, hi) of slabs k, v into the running (acc, l, m) of one Q tile.

    MASKED=False is only called on tiles wholly at or below the diagonal, which also lie wholly
    inside [0, Tk), so neither the causal mask nor a bounds check is needed there.
    """
    offs_n0 = tl.arange(0, BLOCK_N).to(offs_d.dtype)  # int64 where the kernel's offsets are
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        kT = _load_operand(k, offs_n, offs_d, D, MASKED, FP32_PRECISION, TRANS=True)
        s = _capped(_dot(q, kT, None, FP32_PRECISION), head)[0]  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, head), s, float("-inf"))
        # With qk_scale > 0 the row maximum of the scaled scores is that of the raw ones,
        # scaled, and the scaling rides on the subtraction: one fused multiply-add per score,
        # rounded once near 0 rather than at the size of the score (the backward does the same).
        m_new = tl.maximum(m_i, _row_max(s, head))
        m_use = m_new
        if (head.WINDOW or head.LENGTHS or head.RIGHT) and MASKED:
            # A tile the window's left edge crosses (or, with LENGTHS, any masked tile) can hold
            # rows that see none of its keys before they have seen any (m still -inf): their
            # weights are exp2(-inf - 0) = 0, not exp2(-inf + inf). m itself stays -inf, so the
            # next tile takes the true max, and a row that never sees a key ends with l = 0.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp2_weights(tl.fma(s, head.qk_scale, -m_use[:, None]), head)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        if DROPOUT:
            keep = _keep(head.seed, head.bh, offs_m, start_n, head.dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p / (1.0 - head.dropout_p), 0.0)
        v_tile = _load_operand(v, offs_n, offs_d, D, MASKED, FP32_PRECISION)  # (BLOCK_N, HEAD_DIM)
        if MASKED:
            # Here masked weights are 0, and 0 * NaN is NaN: a NaN or inf value that a query
            # cannot see would reach its output through the dot. Such values are zeroed, and a
            # row that can see one gets NaN instead (the contract of kernels/masking.py): row i
            # sees the tile's first bad key j iff j <= i + offset.
            finite = _finite(v_tile)
            key_ok = tl.min(finite.to(tl.int32), 1)  # (BLOCK_N,): 0 where the value is not finite
            if head.WINDOW or head.LENGTHS or head.RIGHT:  # a row sees a bad key iff it sees one
                row_bad = tl.sum(tl.where(_visible(offs_m, offs_n, head), 1 - key_ok[None, :], 0), 1) > 0
            else:
                bad_keys = tl.where(key_ok == 0, offs_n, head.Tk)  # (BLOCK_N,)
                row_bad = tl.min(bad_keys, 0) <= offs_m + head.offset  # (BLOCK_M,)
            v_tile = tl.where(finite, v_tile, 0.0)
        acc = _dot(_tf32_rounded(_to(p, v_tile.dtype), FP32_PRECISION), v_tile,
                   acc * alpha[:, None], FP32_PRECISION)
        if MASKED:
            l_i = tl.where(row_bad, float("nan"), l_i)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(Q, K, V, O, LSE, SEED, SEQ_Q, SEQ_K, SINKS, stride_q, stride_k, stride_v, stride_o,
              stride_stats, H, GROUP, Tq, Tk, scale, dropout_p, LEFT, SPLIT_N, SHIFT, CAP,
              TQ_BUCKET, TK_BUCKET,  # autotune keys only
              D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
              HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
              SPLIT: tl.constexpr, FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
              RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # With SPLIT (flash-decoding), the grid's third axis splits the keys into ranges of SPLIT_N
    # (a multiple of BLOCK_N): each program writes its range's normalised output and lse to
    # float32 rows of its own (O and LSE hold num_programs(2) times B batch entries), and
    # _combine_splits merges them.
    # Row blocks near the bottom of the triangle have the most key tiles: launch them first so
    # the short ones fill the tail of the grid instead of leaving SMs idle at the end.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b, h, bh = _batch_and_head(H)
    head = _head(b, h, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p, LEFT,
                 DROPOUT, HUGE_SCALE, WINDOW, ROWS, SHIFT, CAP, RIGHT, SOFTCAP)
    if start_m >= head.Tq:  # packed sequences: the grid covers the longest one
        return
    hk = h // GROUP  # the key/value head of query head h
    out_b = b  # the batch entry of O and LSE this program writes
    if SPLIT:
        out_b = tl.program_id(2) * (tl.num_programs(1) // H) + b
    q_slab, o = (_slab(Q, stride_q, b, h, head.q_start, head.Tq),
                 _slab(O, stride_o, out_b, h, head.q_start, head.Tq))
    k, v = (_slab(K, stride_k, b, hk, head.k_start, head.Tk_slab),
            _slab(V, stride_v, b, hk, head.k_start, head.Tk_slab))
    offs_m = _offsets(start_m, BLOCK_M, OFFS_64)
    offs_d = _offsets(0, HEAD_DIM, OFFS_64)
    q = _load_operand(q_slab, offs_m, offs_d, D, True, FP32_PRECISION)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # the head's sink logit starts every row's softmax as one more key, value 0
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, lo_full, full_end, diag_end = _key_stages(start_m, head, BLOCK_M, BLOCK_N)
    if SPLIT:  # this program's key range only: each stage clipped to it
        k0 = tl.program_id(2) * SPLIT_N
        k1 = k0 + SPLIT_N
        lo = tl.minimum(tl.maximum(lo, k0), k1)
        lo_full = tl.minimum(tl.maximum(lo_full, k0), k1)
        full_end = tl.minimum(tl.maximum(full_end, k0), k1)
        diag_end = tl.minimum(tl.maximum(diag_end, k0), k1)
    if WINDOW:  # the tiles the window's left edge crosses
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k, v, offs_m, offs_d, lo,
                                   tl.minimum(lo_full, full_end), head, D=D, BLOCK_M=BLOCK_M,
                                   BLOCK_N=BLOCK_N, MASKED=True, DROPOUT=DROPOUT,
                                   FP32_PRECISION=FP32_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k, v, offs_m, offs_d, lo_full, full_end, head, D=D,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=False, DROPOUT=DROPOUT,
                               FP32_PRECISION=FP32_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k, v, offs_m, offs_d, tl.maximum(full_end, lo),
                               diag_end, head, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
                               DROPOUT=DROPOUT, FP32_PRECISION=FP32_PRECISION)
    # Kept in base 2, as the backward uses it: a trip through the natural log would round
    # twice more, at the size of the largest scaled score. A row that saw no key: -inf.
    if ROWS != 0:  # a row that saw no key gives zeros (its acc is 0) and lse -inf (its m)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    stats = _row_stats(LSE, head) + (out_b - b) * stride_stats[0]
    tl.store(stats + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < head.Tq)
    _store_tile(o, offs_m, offs_d, D, acc / l_i[:, None])
