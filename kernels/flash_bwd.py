"""The backward kernels: dQ, dK and dV of the forward in flash_fwd.py, recomputing the
probabilities from the saved row log-sum-exp (the shared pieces are in flash_tiles.py).

One kernel holds a Q tile and streams K/V (dQ; it also takes delta = rowsum(dO * O) for its rows
and stores it), then one holds a K/V tile on chip and streams the query rows that see it (dK,
dV): two launches, each output element written by exactly one program, deterministic, no
atomics. Short sequences (16-bit, D <= 64, at most flash_launch.FUSED_MAX_TK keys) take one
launch instead: _attn_bwd_fused gives each (batch, head) one program that runs both passes in
turn (the same block functions, _dq_block and _dkdv_block). With deterministic=False
(kernels/settings.py) the dK/dV kernel also adds its share of dQ with float32 atomics and no dQ
kernel runs, which saves recomputing QK^T and dO V^T (_bwd_preprocess takes delta first).
"""
import triton
import triton.language as tl

from .flash_tiles import (_NO_SPECIALIZE, _batch_and_head, _capped, _dot, _dot_x3, _exp2_weights,
                          _finite,
                          _head, _keep, _key_stages, _load_operand, _load_tile, _member, _offsets,
                          _query_stages, _row_stats, _slab, _stats_offset, _store_tile, _to,
                          _visible)


@triton.jit
def _delta(o, do, delta_row, offs_m, row_ok, DELTA_OFFSET: tl.constexpr):
    """Store and return delta = rowsum(dO * O) for these rows. The log-sum-exp's own gradient
    g (where the caller uses it) adds p * g to every dS of its row, which is the same as taking
    delta - g: with DELTA_OFFSET the rows hold -g beforehand, and it is added."""
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if DELTA_OFFSET:
        delta += tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
    tl.store(delta_row + offs_m, delta, mask=row_ok)
    return delta


@triton.jit
def _bwd_preprocess(O, DO, DELTA, SEQ_Q, SEQ_K, stride_o, stride_do, stride_stats, H, Tq, Tk,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                    OFFS_64: tl.constexpr, DELTA_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d], the row term of the softmax gradient (with
    DELTA_OFFSET, plus what DELTA holds already: see _delta)."""
    b, h, bh = _batch_and_head(H)
    head = _head(b, h, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, 1.0, DELTA, 0.0, 0, False,
                 False, False, ROWS)
    offs_m = _offsets(tl.program_id(0) * BLOCK_M, BLOCK_M, OFFS_64)
    offs_d = _offsets(0, HEAD_DIM, OFFS_64)
    o = _load_tile(_slab(O, stride_o, b, h, head.q_start, head.Tq), offs_m, offs_d, D, CHECK_ROWS=True)
    do = _load_tile(_slab(DO, stride_do, b, h, head.q_start, head.Tq), offs_m, offs_d, D,
                    CHECK_ROWS=True)
    _delta(o, do, _row_stats(DELTA, head), offs_m, offs_m < head.Tq, DELTA_OFFSET)


@triton.jit
def _lse_rows(lse, offs_m, row_ok, head):
    """The forward's (base-2) log-sum-exp of these rows, +inf past the last row and, with
    LENGTHS, for rows that saw no key (-inf in the forward): their weights come out exactly 0."""
    lse2 = tl.load(lse + offs_m, mask=row_ok, other=float("inf"))
    if head.LENGTHS:
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    return lse2


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, q_slab, do_slab, lse, delta, dq_acc, start_n, offs_n, offs_d,
                    lo, hi, head, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr,
                    DETERMINISTIC: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in transposed form; unless
    DETERMINISTIC, also add this key tile's share of dQ (dS @ K, unscaled) to the float32 rows
    at dq_acc, (Tq, HEAD_DIM) contiguous.

    Rows past Tq load lse = +inf, so their probabilities are exactly 0 and they add nothing.
    """
    HEAD_DIM: tl.constexpr = offs_d.shape[0]
    offs_m0 = tl.arange(0, BLOCK_M).to(offs_d.dtype)  # int64 where the kernel's offsets are
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        row_ok = offs_m < head.Tq
        qT = _load_operand(q_slab, offs_m, offs_d, D, True, FP32_PRECISION, TRANS=True)
        lse2 = _lse_rows(lse, offs_m, row_ok, head)
        sT, tT = _capped(_dot(k, qT, None, FP32_PRECISION), head)
        pT = _exp2_weights(tl.fma(sT, head.qk_scale, -lse2[None, :]), head)
        if MASKED:
            pT = tl.where(_visible(offs_m, offs_n, head, TRANS=True), pT, 0.0)
        do = _load_tile(do_slab, offs_m, offs_d, D, CHECK_ROWS=True)  # (BLOCK_M, HEAD_DIM)
        dpT = _dot_x3(v, tl.trans(do), None, FP32_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = tl.trans(_keep(head.seed, head.bh, offs_m, start_n, head.dropout_p,
                                  BLOCK_M, BLOCK_N))
            pT_kept = tl.where(keep, pT / (1.0 - head.dropout_p), 0.0)
            dpT = tl.where(keep, dpT / (1.0 - head.dropout_p), 0.0)
        else:
            pT_kept = pT
        dv = _dot_x3(_to(pT_kept, do.dtype), do, dv, FP32_PRECISION)
        delta_i = tl.load(delta + offs_m, mask=row_ok, other=0.0)
        if MASKED:  # a row that sees a non-finite value has delta NaN; its masked dS stay 0
            delta_i = tl.where(_finite(delta_i), delta_i, 0.0)
        dsT = pT * (dpT - delta_i[None, :])
        if head.SOFTCAP:  # the chain rule through cap * tanh(s / cap)
            dsT = dsT * (1.0 - tT * tT)
        dsT = _to(dsT, qT.dtype)
        dk = _dot_x3(dsT, tl.trans(qT), dk, FP32_PRECISION)
        if not DETERMINISTIC:
            # Transposed, K^T dS^T, so the product's M side is the head dim rather than
            # the 32 query rows, too few for Hopper's wgmma (Triton would use mma.sync).
            dqT = _dot_x3(tl.trans(k), dsT, None, FP32_PRECISION)  # (HEAD_DIM, BLOCK_M)
            tl.atomic_add(dq_acc + offs_m[None, :] * HEAD_DIM + offs_d[:, None], dqT,
                          mask=row_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_block(start_n, Q, stride_q, DO, stride_do, b, h0, GROUP, k_slab, v_slab, dk_slab, dv_slab,
                LSE, DELTA, DQ_ACC, head, scale, D: tl.constexpr, HEAD_DIM: tl.constexpr,
                OFFS_64: tl.constexpr, DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr,
                DETERMINISTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of the key tile at start_n: hold it, stream the query rows that see it, of
    each of the GROUP query heads h0, h0 + 1, ... that read this key/value head, in that order
    (the group's sum, deterministic). head is the Head of query head h0."""
    offs_n = _offsets(start_n, BLOCK_N, OFFS_64)
    offs_d = _offsets(0, HEAD_DIM, OFFS_64)
    k = _load_operand(k_slab, offs_n, offs_d, D, True, FP32_PRECISION)
    v = _load_operand(v_slab, offs_n, offs_d, D, True, FP32_PRECISION)
    # A NaN or inf value (or, for the atomic dQ, key) must not reach through 0 * NaN the
    # gradients that masked pairs contribute; the gradients of such a position itself are not
    # defined. Once per key tile, not per query tile.
    v = tl.where(_finite(v), v, 0.0)
    if not DETERMINISTIC:
        k = tl.where(_finite(k), k, 0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    first, full, tail_lo, tail_hi = _query_stages(start_n, head, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        member = _member(head, g)
        q_slab = _slab(Q, stride_q, b, h0 + g, head.q_start, head.Tq)
        do_slab = _slab(DO, stride_do, b, h0 + g, head.q_start, head.Tq)
        lse, delta = _row_stats(LSE, member), _row_stats(DELTA, member)
        dq_acc = DQ_ACC + _stats_offset(member) * HEAD_DIM  # (Tq, HEAD_DIM) float32
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_slab, do_slab, lse, delta, dq_acc, start_n, offs_n,
                                 offs_d, first, full, member, D=D, BLOCK_M=BLOCK_M,
                                 BLOCK_N=BLOCK_N, MASKED=True, DROPOUT=DROPOUT,
                                 FP32_PRECISION=FP32_PRECISION, DETERMINISTIC=DETERMINISTIC)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_slab, do_slab, lse, delta, dq_acc, start_n, offs_n,
                                 offs_d, full, tail_lo, member, D=D, BLOCK_M=BLOCK_M,
                                 BLOCK_N=BLOCK_N, MASKED=False, DROPOUT=DROPOUT,
                                 FP32_PRECISION=FP32_PRECISION, DETERMINISTIC=DETERMINISTIC)
        if head.WINDOW:  # the query tiles the window's left edge crosses
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_slab, do_slab, lse, delta, dq_acc, start_n,
                                     offs_n, offs_d, tail_lo, tail_hi, member, D=D,
                                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
                                     DROPOUT=DROPOUT, FP32_PRECISION=FP32_PRECISION,
                                     DETERMINISTIC=DETERMINISTIC)
    dk = dk * scale
    _store_tile(dk_slab, offs_n, offs_d, D, dk)
    _store_tile(dv_slab, offs_n, offs_d, D, dv)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, SEED, DQ_ACC, SEQ_Q, SEQ_K,
                   stride_q, stride_k, stride_v, stride_do, stride_dk, stride_dv, stride_stats,
                   H, GROUP, Tq, Tk, scale, dropout_p, LEFT, SHIFT, CAP,
                   TQ_BUCKET, TK_BUCKET,
                   D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                   HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                   FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
                   DETERMINISTIC: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per key tile of each key/value head (B * H // GROUP of them).
    b, hk, bhk = _batch_and_head(H // GROUP)
    start_n = tl.program_id(0) * BLOCK_N  # key tiles on the left see the most rows: first
    head = _head(b, hk * GROUP, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p,
                 LEFT, DROPOUT, HUGE_SCALE, WINDOW, ROWS, SHIFT, CAP, RIGHT, SOFTCAP)
    if start_n >= head.Tk_slab:  # packed sequences: the grid covers the longest one
        return
    _dkdv_block(start_n, Q, stride_q, DO, stride_do, b, hk * GROUP, GROUP,
                _slab(K, stride_k, b, hk, head.k_start, head.Tk_slab),
                _slab(V, stride_v, b, hk, head.k_start, head.Tk_slab),
                _slab(DK, stride_dk, b, hk, head.k_start, head.Tk_slab),
                _slab(DV, stride_dv, b, hk, head.k_start, head.Tk_slab),
                LSE, DELTA, DQ_ACC, head, scale, D=D, HEAD_DIM=HEAD_DIM, OFFS_64=OFFS_64,
                DROPOUT=DROPOUT, FP32_PRECISION=FP32_PRECISION, DETERMINISTIC=DETERMINISTIC,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse2, delta, k, v, offs_m, offs_d, lo, hi, head, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi) of slabs k, v."""
    offs_n0 = tl.arange(0, BLOCK_N).to(offs_d.dtype)  # int64 where the kernel's offsets are
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        kT = _load_operand(k, offs_n, offs_d, D, MASKED, FP32_PRECISION, TRANS=True)
        vT = _load_operand(v, offs_n, offs_d, D, MASKED, FP32_PRECISION, TRANS=True)
        if MASKED:  # a non-finite key adds nothing to the dQ of a query that cannot see it
            kT = tl.where(_finite(kT), kT, 0.0)
        s, t = _capped(_dot(q, kT, None, FP32_PRECISION), head)
        p = _exp2_weights(tl.fma(s, head.qk_scale, -lse2[:, None]), head)
        dp = _dot_x3(do, vT, None, FP32_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _keep(head.seed, head.bh, offs_m, start_n, head.dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - head.dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if head.SOFTCAP:  # the chain rule through cap * tanh(s / cap)
            ds = ds * (1.0 - t * t)
        if MASKED:  # dP is NaN where a masked value is: select, do not multiply by 0
            ds = tl.where(_visible(offs_m, offs_n, head), ds, 0.0)
        dq = _dot_x3(_to(ds, kT.dtype), tl.trans(kT), dq, FP32_PRECISION)
    return dq


@triton.jit
def _dq_block(start_m, q_slab, do_slab, o_slab, dq_slab, k_slab, v_slab, lse, delta_out, head, scale,
              D: tl.constexpr, HEAD_DIM: tl.constexpr, OFFS_64: tl.constexpr,
              DROPOUT: tl.constexpr, FP32_PRECISION: tl.constexpr, DELTA_OFFSET: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of the query tile at start_m: hold it, stream the key tiles it sees. It also takes
    its rows' delta = rowsum(dO * O), the row term of the softmax gradient, and stores it for
    the dK/dV pass that follows (so no preprocessing launch is needed)."""
    offs_m = _offsets(start_m, BLOCK_M, OFFS_64)
    offs_d = _offsets(0, HEAD_DIM, OFFS_64)
    row_ok = offs_m < head.Tq
    q = _load_operand(q_slab, offs_m, offs_d, D, True, FP32_PRECISION)
    do = _load_tile(do_slab, offs_m, offs_d, D, CHECK_ROWS=True)
    o = _load_tile(o_slab, offs_m, offs_d, D, CHECK_ROWS=True)
    delta = _delta(o, do, delta_out, offs_m, row_ok, DELTA_OFFSET)
    lse2 = _lse_rows(lse, offs_m, row_ok, head)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, lo_full, full_end, diag_end = _key_stages(start_m, head, BLOCK_M, BLOCK_N)
    if head.WINDOW:  # the tiles the window's left edge crosses
        dq = _bwd_dq_tiles(dq, q, do, lse2, delta, k_slab, v_slab, offs_m, offs_d, lo,
                           tl.minimum(lo_full, full_end), head, D=D, BLOCK_M=BLOCK_M,
                           BLOCK_N=BLOCK_N, MASKED=True, DROPOUT=DROPOUT,
                           FP32_PRECISION=FP32_PRECISION)
    dq = _bwd_dq_tiles(dq, q, do, lse2, delta, k_slab, v_slab, offs_m, offs_d, lo_full, full_end,
                       head, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=False, DROPOUT=DROPOUT,
                       FP32_PRECISION=FP32_PRECISION)
    dq = _bwd_dq_tiles(dq, q, do, lse2, delta, k_slab, v_slab, offs_m, offs_d,
                       tl.maximum(full_end, lo), diag_end, head, D=D, BLOCK_M=BLOCK_M,
                       BLOCK_N=BLOCK_N, MASKED=True, DROPOUT=DROPOUT,
                       FP32_PRECISION=FP32_PRECISION)
    dq = dq * scale
    _store_tile(dq_slab, offs_m, offs_d, D, dq)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, O, DQ, LSE, DELTA, SEED, SEQ_Q, SEQ_K,
                 stride_q, stride_k, stride_v, stride_do, stride_o, stride_dq, stride_stats,
                 H, GROUP, Tq, Tk, scale, dropout_p, LEFT, SHIFT, CAP,
                 TQ_BUCKET, TK_BUCKET,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                 HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                 FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
                 DELTA_OFFSET: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    b, h, bh = _batch_and_head(H)
    head = _head(b, h, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p, LEFT,
                 DROPOUT, HUGE_SCALE, WINDOW, ROWS, SHIFT, CAP, RIGHT, SOFTCAP)
    if start_m >= head.Tq:  # packed sequences: the grid covers the longest one
        return
    hk = h // GROUP
    _dq_block(start_m, *_query_slabs(Q, stride_q, DO, stride_do, O, stride_o, DQ, stride_dq, b, h,
                                     head),
              _slab(K, stride_k, b, hk, head.k_start, head.Tk_slab),
              _slab(V, stride_v, b, hk, head.k_start, head.Tk_slab),
              _row_stats(LSE, head), _row_stats(DELTA, head), head, scale, D=D,
              HEAD_DIM=HEAD_DIM, OFFS_64=OFFS_64, DROPOUT=DROPOUT, FP32_PRECISION=FP32_PRECISION,
              DELTA_OFFSET=DELTA_OFFSET, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


@triton.jit
def _query_slabs(Q, stride_q, DO, stride_do, O, stride_o, DQ, stride_dq, b, h, head):
    """The slabs of query head h that the dQ pass reads and writes: q, do, o, dq."""
    return (_slab(Q, stride_q, b, h, head.q_start, head.Tq),
            _slab(DO, stride_do, b, h, head.q_start, head.Tq),
            _slab(O, stride_o, b, h, head.q_start, head.Tq),
            _slab(DQ, stride_dq, b, h, head.q_start, head.Tq))


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_fused(Q, K, V, DO, O, DQ, DK, DV, LSE, DELTA, SEED, SEQ_Q, SEQ_K,
                    stride_q, stride_k, stride_v, stride_do, stride_o, stride_dq, stride_dk,
                    stride_dv, stride_stats, H, GROUP, Tq, Tk, scale, dropout_p, LEFT, SHIFT,
                    CAP, TQ_BUCKET, TK_BUCKET,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                    HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                    FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
                    DELTA_OFFSET: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The whole backward of one (batch, key/value head) in one program, for short sequences:
    the dQ pass over the query tiles of each query head of its group (which also stores delta),
    then the dK/dV pass over its key tiles. One launch instead of two; no atomics, each output
    written once: deterministic."""
    b, hk, bhk = _batch_and_head(H // GROUP)
    head = _head(b, hk * GROUP, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p,
                 LEFT, DROPOUT, HUGE_SCALE, WINDOW, ROWS, SHIFT, CAP, RIGHT, SOFTCAP)
    k = _slab(K, stride_k, b, hk, head.k_start, head.Tk_slab)
    v = _slab(V, stride_v, b, hk, head.k_start, head.Tk_slab)
    for g in range(GROUP):
        member = _member(head, g)
        q, do, o, dq = _query_slabs(Q, stride_q, DO, stride_do, O, stride_o, DQ, stride_dq, b,
                                    hk * GROUP + g, head)
        lse, delta = _row_stats(LSE, member), _row_stats(DELTA, member)
        for start_m in range(0, head.Tq, BLOCK_M):
            _dq_block(start_m, q, do, o, dq, k, v, lse, delta, member, scale, D=D,
                      HEAD_DIM=HEAD_DIM, OFFS_64=OFFS_64, DROPOUT=DROPOUT,
                      FP32_PRECISION=FP32_PRECISION, DELTA_OFFSET=DELTA_OFFSET,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    # The dK/dV pass reads the delta the other threads of this program just stored.
    tl.debug_barrier()
    for start_n in range(0, head.Tk_slab, BLOCK_N):
        _dkdv_block(start_n, Q, stride_q, DO, stride_do, b, hk * GROUP, GROUP, k, v,
                    _slab(DK, stride_dk, b, hk, head.k_start, head.Tk_slab),
                    _slab(DV, stride_dv, b, hk, head.k_start, head.Tk_slab),
                    LSE, DELTA, DELTA, head, scale, D=D, HEAD_DIM=HEAD_DIM, OFFS_64=OFFS_64,
                    DROPOUT=DROPOUT, FP32_PRECISION=FP32_PRECISION, DETERMINISTIC=True,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
