"""The jitted pieces every attention kernel shares (flash_fwd.py, flash_bwd.py, hopper.py).

Notation: B batch, H heads, Tq queries, Tk keys (Tq <= Tk), D head dim. The causal mask is
bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq); call Tk - Tq the offset.
With dense rows every query sees key 0, so no row is fully masked (see Rows below).

How a kernel sees its tensors: each tensor comes with one stride tuple (stride_q = q.stride(),
any layout). A program first finds its head (_batch_and_head; _head gathers what every tile
loop needs: lengths, causal offset, scale, dropout draw), then each tensor's (T, D) slab for
that head (_slab). Tiles are read and written through _load_tile / _load_operand /
_store_tile, which guard only the sides that can overrun (rows past T, a padded head dim);
_visible is the causal mask and _key_stages / _query_stages split each loop into its unmasked
and masked stages. Compile-time flags go by keyword (MASKED=True). So a new per-head quantity
is one field of Head, a new layout or head mapping one line of _slab, a new mask _visible and
the stage bounds.

Rows (the ROWS constexpr, _rows): where each batch entry's query and key rows start, how many
there are and the causal offset. DENSE is the tensors as they are; KEY_LENGTHS hides keys past
a per-row length (seqlens_k); CACHE_LENGTHS is a decode step (the queries the last Tq of the
valid keys); PACKED reads flash-attn's cu_seqlens, the packed tensors seen as B entries of batch
stride 0, each finding its first row, the grid covering the longest sequence. With any of the
last three a row may see no key: it gets zeros and lse -inf (the backward reads +inf there).

Dropout: a 32-bit Philox draw per (head, row, key), four keys to a Philox call, from a seed that
the wrapper takes from torch's generator; the backward regenerates the same mask from the seed
(_keep).

Masked positions never reach an output (kernels/masking.py states the contract): only the tiles
the diagonal crosses hold masked (query, key) pairs, and there a masked weight of 0 times a NaN
value would still be NaN, so those tiles zero non-finite values and mark the rows that can see
one (_finite); the backward keeps masked pairs' dS at exactly 0. Scales above 1 get a
specialisation (HUGE_SCALE) whose softmax rounds the row maximum down and caps exponents at 0
(_row_max, _exp2_weights), so that scaled scores far past 2**30 neither overflow exp2 nor leave a
row with only zeros.
"""
import os
from collections import namedtuple

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Lengths vary call to call; specialising on them (divisible by 16 or not) would recompile
# every config for each new length, which is most of the cost of a first call. The head dim D
# is the opposite: a model has one, and it is a constexpr, because a padded head dim (40 of 64)
# masks the loads along D; only a known D lets those loads vectorise, and without vector
# loads Triton cannot pipeline them (bench/compile_report.py showed D=40 unpipelined).
_NO_SPECIALIZE = ["H", "Tq", "Tk", "TQ_BUCKET", "TK_BUCKET", "LEFT", "SPLIT_N", "SHIFT"]

# ----------------------------------------------------------------------------------------------
# Arithmetic: rounding, dots, the dropout draw, the guarded softmax
# ----------------------------------------------------------------------------------------------

# Two faults of Triton's CPU interpreter (seen with Triton 3.9), mended under the interpreter
# only, so that the CPU tests see the numbers a GPU computes:
# - tl.dot on bfloat16 operands returns garbage (float16 is right). Dots take float32 operands
#   instead; a product of two bf16/fp16 values is exact in fp32, so no result changes.
# - float32 -> bfloat16 casts truncate, where GPUs round to nearest even; _to rounds by hand.
# - bfloat16 arithmetic gives inf - inf = 0 (and NaN - NaN = 0); _finite works in float32.
_INTERPRETER_FIXES = tl.constexpr(INTERPRET)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does."""
    if _INTERPRETER_FIXES and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _round_tf32(x):
    """float32 -> nearest tf32 (10-bit mantissa), ties to even, kept in a float32 register."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0xFFF + ((bits >> 13) & 1))) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tf32_rounded(x, FP32_PRECISION: tl.constexpr):
    """x as a tf32 dot should read it: float32 rounded to the nearest tf32, in tf32 mode.

    The tensor cores read a float32 operand as tf32 by dropping its low 13 bits: that
    truncation is biased, and measured on an H100 it made our error over twice PyTorch's tf32
    error (cuBLAS rounds). Rounding first makes the drop exact; under the interpreter, it is
    also what makes a float32 dot behave as tf32. Each operand is rounded once, where it is
    loaded or made. The backward rounds Q, K and V exactly as the forward did: the saved LSE and
    delta = rowsum(dO * O) come from the rounded ones, and with unrounded ones the recomputed P
    no longer matches the LSE and dP - delta is off by dO . (V - round(V)). With one key P = 1
    and the true dQ and dK are 0, as PyTorch's are; ours were 1e-3 before this."""
    if FP32_PRECISION == "tf32" and x.dtype == tl.float32:
        x = _round_tf32(x)
    return x


@triton.jit
def _dot(a, b, acc, FP32_PRECISION: tl.constexpr):
    """a @ b (+ acc), accumulating in float32. In tf32 mode the operands must come through
    _tf32_rounded."""
    if _INTERPRETER_FIXES:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=FP32_PRECISION)


@triton.jit
def _dot_x3(a, b, acc, FP32_PRECISION: tl.constexpr):
    """A backward dot with an operand the forward never multiplied (dO, P, dS). In tf32 mode
    these take three tf32 passes (hi*hi + hi*lo + lo*hi, near-fp32): single-pass tf32 left dK
    at over twice PyTorch's own tf32 error, as those errors do not cancel the way they do in
    plain math."""
    if FP32_PRECISION == "tf32" and a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = _dot(a, b, acc, FP32_PRECISION)
    return out


@triton.jit
def _keep(seed, bh, offs_m, start_n, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of the (BLOCK_M, BLOCK_N) tile at rows offs_m, keys start_n + ...: True
    where that weight of head bh survives.

    One Philox call gives four 32-bit draws, so each call serves four neighbouring keys: the
    call with counter (key group g, head, row, 0) fills keys 4g .. 4g + 3. That is a quarter of
    the Philox work of one call per weight, and the mask does not depend on the tile sizes
    (BLOCK_N is a multiple of 4 and tiles start at multiples of BLOCK_N), so the forward and
    both backward kernels, each with its own tiles, redraw the same mask. Row, head and group
    each have a counter word of their own, so no two weights share a draw at any length (one
    word holding row * Tk / 4 + g would wrap from T = 131072 on).
    """
    zero = tl.zeros([BLOCK_M, BLOCK_N // 4], tl.uint32)
    groups = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    c0 = zero + groups[None, :]
    c1 = zero + bh.to(tl.uint32)
    c2 = zero + offs_m[:, None].to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    k0 = (tl.uint_to_uniform_float(r0) >= dropout_p).to(tl.int8)  # int8: the common case
    k1 = (tl.uint_to_uniform_float(r1) >= dropout_p).to(tl.int8)  # for join and reshape
    k2 = (tl.uint_to_uniform_float(r2) >= dropout_p).to(tl.int8)
    k3 = (tl.uint_to_uniform_float(r3) >= dropout_p).to(tl.int8)
    # join adds a minor axis: this is (M, N/4, 2, 2) with [m, g, i, j] = k_{2i+j}, so the
    # row-major reshape puts k_j at key 4g + j.
    return tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _dropout_mask_kernel(SEED, MASK, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the keep-mask the kernels use, as a (B*H, Tq, Tk) int8 tensor: tests only."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), bh, offs_m, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = MASK + bh.to(tl.int64) * Tq * Tk + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


@triton.jit
def _offsets(start, N: tl.constexpr, OFFS_64: tl.constexpr):
    """start + [0, N): row or column indices, in int64 where an offset inside one head's
    (T, D) slab can pass 2**31 (OFFS_64, see _offsets_need_64). Products with them (the
    pointer offsets) are then int64 too; batch and head offsets always are."""
    offs = start + tl.arange(0, N)
    if OFFS_64:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _product_rounded_down(a, b):
    """a * b rounded toward -inf: rounded to nearest, then one step down where that rounded up
    (the fused multiply-add gives the product's exact rounding error). A row maximum taken so
    never exceeds the exact one, so exp2(fma(s, scale, -m)) of the row's largest score is at
    least 1 and cannot underflow to 0, at any magnitude (-inf stays -inf)."""
    m = a * b
    err = tl.fma(a, b, -m)  # exact - rounded; NaN for -inf * b, which then stays as it is
    bits = m.to(tl.int32, bitcast=True)
    down = tl.where(m > 0, bits - 1, tl.where(m < 0, bits + 1, -2147483647))  # 0 -> -2**-149
    return tl.where(err < 0, down.to(tl.float32, bitcast=True), m)


@triton.jit
def _exp2_weights(x, head):
    """exp2(x) for softmax exponents x = scaled score - row maximum (or - LSE). With HUGE_SCALE
    (|scale| > 1: scaled scores can pass 2**30, where the row maximum's rounding is larger than
    exp2's range) x is capped at 0 first, NaN staying NaN; otherwise nothing is added to the
    hot loop."""
    if head.HUGE_SCALE:
        x = tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.math.exp2(x)


@triton.jit
def _row_max(s, head):
    """The scaled row maximum of raw scores s (BLOCK_M, BLOCK_N); with HUGE_SCALE rounded down,
    so that the row's largest weight is 1 and not 0 (_product_rounded_down)."""
    if head.HUGE_SCALE:
        m = _product_rounded_down(tl.max(s, 1), head.qk_scale)
    else:
        m = tl.max(s, 1) * head.qk_scale
    return m


@triton.jit
def _tanh(x):
    """tanh(x) from exp2, which every backend and the interpreter have: 1 - 2 / (e^2x + 1),
    exactly +-1 far out (e^2x is inf or 0 there), NaN staying NaN."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 log2(e)


@triton.jit
def _capped(s, head):
    """(scores, tanh) of raw scores s under softcapping (SOFTCAP): cap * tanh(s / cap), with cap
    = softcap / scale in raw-score units, so that the scaled score is softcap * tanh(scaled /
    softcap); the tanh is what the backward's chain rule needs (1 - tanh^2). Without SOFTCAP,
    (s, s), nothing computed."""
    t = s
    if head.SOFTCAP:
        t = _tanh(s / head.cap)
        s = head.cap * t
    return s, t


@triton.jit
def _finite(x):
    """True where x is neither NaN nor +-inf (x - x is 0 exactly there)."""
    if _INTERPRETER_FIXES:
        x = x.to(tl.float32)
    return (x - x) == 0


# ----------------------------------------------------------------------------------------------
# One (batch, head) program's view of its tensors
# ----------------------------------------------------------------------------------------------

# One head's (T, D) slab of a (B, H, T, D) tensor with any strides: its first element, the
# strides between rows (positions) and columns (head-dim entries), and its number of rows.
# Every kernel reads and writes its tensors through slabs, so a new layout or a new way of
# finding a head (another head for k/v, an offset into packed sequences) changes _slab alone.
Slab = namedtuple("Slab", ["ptr", "stride_t", "stride_d", "T"])

# What every tile of one head needs beside its slabs: the lengths (Tq query rows; Tk keys a row
# may see, Tk_slab keys stored), the causal offset (query i sees key j iff j <= i + offset; a
# window's right side or full attention shift it right, RIGHT),
# where this head's rows start in packed sequences (q_start, k_start) and in the row statistics
# (stats; stats_h between query heads), the scale in base 2, the dropout draw's seed, head and
# probability, the window's reach, softcapping's cap in raw-score units, and the constexpr
# flags: HUGE_SCALE (the softmax guarded for scaled scores past 2**30), WINDOW, LENGTHS (per-row
# key lengths or packed sequences: keys past Tk hidden, and a row may see no key at all), RIGHT
# (the mask reaches past the diagonal: keys past Tk hidden as with LENGTHS), SOFTCAP.
Head = namedtuple("Head", ["Tq", "Tk", "Tk_slab", "offset", "q_start", "k_start", "stats",
                           "stats_h", "qk_scale", "seed", "bh", "dropout_p", "left", "cap",
                           "HUGE_SCALE", "WINDOW", "LENGTHS", "RIGHT", "SOFTCAP"])

# How the rows of a batch entry are found (the kernels' ROWS constexpr; see Rows below):
DENSE, KEY_LENGTHS, CACHE_LENGTHS, PACKED = 0, 1, 2, 3


@triton.jit
def _batch_and_head(H):
    """(b, h, bh) of this program: the grid's second axis runs over the B * H heads (bh); b
    and h in int64, as the offsets they start are."""
    bh = tl.program_id(1)
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh


@triton.jit
def _rows(SEQ_Q, SEQ_K, b, Tq, Tk, ROWS: tl.constexpr):
    """(q_start, Tq, k_start, Tk, Tk_slab, offset) of batch entry b. DENSE: every row as the
    tensors hold it, offset Tk - Tq. KEY_LENGTHS: SEQ_K[b] keys (clamped to [0, Tk]), the
    mask otherwise as dense. CACHE_LENGTHS: the same keys, with the queries the last Tq
    positions of them (offset SEQ_K[b] - Tq). PACKED: sequence b's rows start at SEQ_Q[b] and
    SEQ_K[b] (cumulative lengths, flash-attn's cu_seqlens), the mask bottom-right within it."""
    if ROWS == 3:
        q_start = tl.load(SEQ_Q + b)
        k_start = tl.load(SEQ_K + b)
        Tq = tl.load(SEQ_Q + b + 1) - q_start
        Tk = tl.load(SEQ_K + b + 1) - k_start
        return q_start.to(tl.int64), Tq, k_start.to(tl.int64), Tk, Tk, Tk - Tq
    elif ROWS != 0:
        n = tl.minimum(tl.maximum(tl.load(SEQ_K + b).to(tl.int32), 0), Tk)
        if ROWS == 1:
            offset = Tk - Tq
        else:
            offset = n - Tq
        return 0, Tq, 0, n, Tk, offset
    else:
        return 0, Tq, 0, Tk, Tk, Tk - Tq


@triton.jit
def _head(b, h, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p, left,
          DROPOUT: tl.constexpr, HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr,
          ROWS: tl.constexpr, shift=0, cap=1.0, RIGHT: tl.constexpr = False,
          SOFTCAP: tl.constexpr = False):
    """The Head of query head h of batch entry b (b, h int64; H heads): what every attention kernel's
    tile loops share. The row statistics (LSE, delta) of a head start at b * stride_stats[0] +
    h * stride_stats[1] + q_start. shift: how far past the diagonal the mask reaches (RIGHT;
    flash_launch._common: a window's right side, or past every key for full attention), added
    to the offset; a window's left then counts from there (left + shift)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    q_start, Tq, k_start, Tk, Tk_slab, offset = _rows(SEQ_Q, SEQ_K, b, Tq, Tk, ROWS)
    stats = b * stride_stats[0] + h * stride_stats[1] + q_start
    bh = (b * H + h).to(tl.int32)  # the dropout draw's head
    qk_scale = scale * 1.4426950408889634  # log2(e): exp2 is cheaper than exp; scale > 0
    if RIGHT:
        offset += shift
    return Head(Tq, Tk, Tk_slab, offset, q_start, k_start, stats, stride_stats[1], qk_scale,
                seed, bh, dropout_p, left, cap, HUGE_SCALE, WINDOW, ROWS != 0, RIGHT, SOFTCAP)


@triton.jit
def _member(head, g):
    """The Head of query head g of a grouped-query group whose first query head is head's (the
    dropout draw and the row statistics are per query head; everything else the group
    shares)."""
    return Head(head.Tq, head.Tk, head.Tk_slab, head.offset, head.q_start, head.k_start,
                head.stats + g * head.stats_h, head.stats_h, head.qk_scale, head.seed,
                head.bh + g, head.dropout_p, head.left, head.cap, head.HUGE_SCALE, head.WINDOW,
                head.LENGTHS, head.RIGHT, head.SOFTCAP)


@triton.jit
def _slab(X, strides, b, h, row0, T):
    """Head h of batch entry b of X, a (B, H, T, D) tensor with these (4) strides, from row
    row0 on (packed sequences; their batch stride is 0), T rows."""
    return Slab(X + b * strides[0] + h * strides[1] + row0 * strides[2], strides[2], strides[3], T)


@triton.jit
def _load_tile(x, rows, cols, D, CHECK_ROWS: tl.constexpr, TRANS: tl.constexpr = False):
    """The (rows, cols) tile of slab x, or with TRANS its transpose, (cols, rows). Guards only
    the sides that can overrun, reading 0 there: rows past x.T where CHECK_ROWS, and head-dim
    columns past D where the columns are padded (cols spans HEAD_DIM, a power of two)."""
    CHECK_COLS: tl.constexpr = cols.shape[0] != D
    if TRANS:
        ptrs = x.ptr + rows[None, :] * x.stride_t + cols[:, None] * x.stride_d
        row_ok = rows[None, :] < x.T
        col_ok = cols[:, None] < D
    else:
        ptrs = x.ptr + rows[:, None] * x.stride_t + cols[None, :] * x.stride_d
        row_ok = rows[:, None] < x.T
        col_ok = cols[None, :] < D
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=row_ok, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=col_ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_operand(x, rows, cols, D, CHECK_ROWS: tl.constexpr, FP32_PRECISION: tl.constexpr,
                  TRANS: tl.constexpr = False):
    """_load_tile of a tile the forward multiplies (Q, K, V): rounded to tf32 in tf32 mode."""
    return _tf32_rounded(_load_tile(x, rows, cols, D, CHECK_ROWS, TRANS), FP32_PRECISION)


@triton.jit
def _store_tile(x, rows, cols, D, value):
    """Store value, rounded to x's dtype, into the (rows, cols) tile of slab x: rows past x.T
    are left alone, and so are head-dim columns past D where the columns are padded."""
    ptrs = x.ptr + rows[:, None] * x.stride_t + cols[None, :] * x.stride_d
    mask = (rows < x.T)[:, None]
    if cols.shape[0] != D:
        mask = mask & (cols[None, :] < D)
    tl.store(ptrs, _to(value, x.ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_offset(head):
    """Where head's float32 row statistics (LSE, delta) start, in elements: (B, H, Tq)
    contiguous, or for packed sequences (H, total query rows). (Dense rows take the shorter
    formula: with head.stats, the dK/dV kernel at D = 128 spilled 32 bytes on sm_90.)"""
    if not head.LENGTHS:
        return head.bh.to(tl.int64) * head.Tq
    return head.stats


@triton.jit
def _row_stats(X, head):
    """Pointer to head's row statistics in X (_stats_offset)."""
    return X + _stats_offset(head)


@triton.jit
def _visible(offs_m, offs_n, head, TRANS: tl.constexpr = False):
    """The causal mask of the tile at query rows offs_m and keys offs_n: True where the query
    sees the key. (M, N), or with TRANS (N, M)."""
    if TRANS:
        seen = offs_n[:, None] <= offs_m[None, :] + head.offset
        if head.WINDOW:
            seen = seen & (offs_n[:, None] >= offs_m[None, :] + head.offset - head.left)
        if head.LENGTHS or head.RIGHT:
            seen = seen & (offs_n[:, None] < head.Tk)
    else:
        seen = offs_n[None, :] <= offs_m[:, None] + head.offset
        if head.WINDOW:
            seen = seen & (offs_n[None, :] >= offs_m[:, None] + head.offset - head.left)
        if head.LENGTHS or head.RIGHT:
            seen = seen & (offs_n[None, :] < head.Tk)
    return seen


@triton.jit
def _key_stages(start_m, head, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows [start_m, start_m + BLOCK_M): key tiles in [lo_full, full_end) are
    seen in full by every row (unmasked); those in [full_end, diag_end) are crossed by the
    diagonal (masked); keys from diag_end on are seen by none. Without a window lo = lo_full =
    0; with one, rows see no key before lo, and the tiles in [lo, lo_full) are crossed by the
    window's left edge (masked): the masked stages are [lo, min(lo_full, full_end)) and
    [max(full_end, lo), diag_end). With LENGTHS, a tile holding the key length is masked too."""
    full_end = (start_m + head.offset + 1) // BLOCK_N * BLOCK_N
    if head.LENGTHS or head.RIGHT:
        full_end = tl.minimum(full_end, head.Tk // BLOCK_N * BLOCK_N)
    diag_end = tl.minimum(head.Tk, start_m + BLOCK_M + head.offset)
    lo = 0
    lo_full = 0
    if head.WINDOW:
        lo = tl.maximum(start_m + head.offset - head.left, 0) // BLOCK_N * BLOCK_N
        lo_full = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + head.offset - head.left, 0),
                          BLOCK_N) * BLOCK_N
    return lo, lo_full, full_end, diag_end


@triton.jit
def _query_stages(start_n, head, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first, full, tail_lo, tail_hi) for the keys [start_n, start_n + BLOCK_N): query tiles in
    [first, full) are crossed by the diagonal (masked), those in [full, tail_lo) see every key
    (unmasked), those in [tail_lo, tail_hi) are crossed by a window's left edge (masked; without
    a window tail_lo = tail_hi = Tq), and rows from tail_hi on see none of these keys. With
    LENGTHS, every row of a key tile that holds the key length is masked, and a tile past it
    is seen by none."""
    first, full = _diagonal_query_stages(start_n, head, BLOCK_M, BLOCK_N)
    if head.LENGTHS or head.RIGHT:
        full = tl.where(start_n + BLOCK_N > head.Tk, head.Tq, full)
        first = tl.where(start_n >= head.Tk, head.Tq, first)
    tail_lo = head.Tq
    tail_hi = head.Tq
    if head.WINDOW:
        # Row i sees key j iff i + offset - left <= j <= i + offset.
        tail_hi = tl.minimum(head.Tq, tl.cdiv(tl.maximum(start_n + BLOCK_N - head.offset + head.left, 0),
                                              BLOCK_M) * BLOCK_M)
        tail_lo = tl.minimum(tl.maximum(tl.maximum(start_n - head.offset + head.left + 1, 0)
                                        // BLOCK_M * BLOCK_M, full), tail_hi)
    return first, full, tail_lo, tail_hi


@triton.jit
def _diagonal_query_stages(start_n, head, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the keys [start_n, start_n + BLOCK_N): rows i >= start_n - offset see some of them
    and rows i >= start_n + BLOCK_N - 1 - offset all of them. Query tiles in [first, full) are
    crossed by the diagonal (masked); those in [full, Tq) see every key (unmasked)."""
    first = tl.maximum(start_n - head.offset, 0) // BLOCK_M * BLOCK_M
    full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - head.offset, 0), BLOCK_M) * BLOCK_M
    full = tl.minimum(tl.maximum(full, first), head.Tq)
    return first, full
