"""Fused causal attention in Triton: FlashAttention-2's algorithm, forward and backward.

Layout of this file, top to bottom: small jitted helpers (rounding, dots, dropout); how one
program sees its tensors (below); the forward kernel; the backward kernels; the launchers (the
configs they try; kernels/autotune.py picks one per specialisation); the torch custom-op
registration; the public functions.

Notation: B batch, H heads, Tq queries, Tk keys (Tq <= Tk), D head dim. The causal mask is
bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq); call Tk - Tq the offset.
With dense rows every query sees key 0, so no row is fully masked (see Rows below).

Forward (one program per BLOCK_M query rows of one head): stream K/V tiles past the Q tile,
keep a running max m and running sum l in float32 (online softmax), in base 2 with log2(e)
folded into the scale. Key tiles wholly below the diagonal run unmasked; only the tiles the
diagonal crosses are masked; tiles above it are never loaded. A sliding window (WINDOW, LEFT:
query i sees keys i + offset - LEFT .. i + offset) adds a masked stage for the tiles its left
edge crosses, and the tiles left of every row's window are never loaded either. Writes O and the row
log-sum-exp for the backward (float32, in base 2: log2(e) times the natural one).

Backward: one kernel that holds a Q tile and streams K/V (dQ; it also takes delta =
rowsum(dO * O) for its rows and stores it), then one that holds a K/V tile on chip and streams
the query rows that see it (dK, dV): two launches, each output element written by exactly one
program, deterministic, no atomics. Short sequences (16-bit, D <= 64, at most FUSED_MAX_TK
keys) take one launch instead: _attn_bwd_fused gives each (batch, head) one program that runs
both passes in turn (the same block functions, _dq_block and _dkdv_block). With
deterministic=False (kernels/settings.py) the dK/dV kernel also adds its share of dQ with
float32 atomics and no dQ kernel runs, which saves recomputing QK^T and dO V^T (a small kernel
takes delta first).

Rows (the ROWS constexpr, _rows): where each batch entry's query and key rows start, how many
there are and the causal offset. DENSE is the tensors as they are; KEY_LENGTHS hides keys past
a per-row length (seqlens_k); CACHE_LENGTHS is a decode step (the queries the last Tq of the
valid keys); PACKED reads flash-attn's cu_seqlens, the packed tensors seen as B entries of batch
stride 0, each finding its first row, the grid covering the longest sequence. With any of the
last three a row may see no key: it gets zeros and lse -inf (the backward reads +inf there).
Flash-decoding (SPLIT): a third grid axis splits the keys into ranges whose outputs and lse
_combine_splits merges.

Launching (host side): the first call of each specialisation (shapes, strides, dtype, scale,
flags, alignment) works its launch out once: the config (kernels/autotune.py), the grid and
every non-tensor argument, kept as a _Plan; later calls pass their tensors to the compiled
kernel's own launcher, with no argument binding or cache lookup per call.

Dropout: a 32-bit Philox draw per (head, row, key), four keys to a Philox call, from a seed that
the wrapper takes from torch's generator; the backward regenerates the same mask from the seed.

Masked positions never reach an output (kernels/masking.py states the contract): only the tiles
the diagonal crosses hold masked (query, key) pairs, and there a masked weight of 0 times a NaN
value would still be NaN, so those tiles zero non-finite values and mark the rows that can see
one; the backward keeps masked pairs' dS at exactly 0. Scales above 1 get a specialisation
(HUGE_SCALE) whose softmax rounds the row maximum down and caps exponents at 0, so that scaled
scores far past 2**30 neither overflow exp2 nor leave a row with only zeros.

How a kernel sees its tensors: each tensor comes with one stride tuple (stride_q = q.stride(),
any layout). A program first finds its head (_batch_and_head; _head gathers what every tile
loop needs: lengths, causal offset, scale, dropout draw), then each tensor's (T, D) slab for
that head (_slab). Tiles are read and written through _load_tile / _load_operand /
_store_tile, which guard only the sides that can overrun (rows past T, a padded head dim);
_visible is the causal mask and _key_stages / _query_stages split each loop into its unmasked
and masked stages. Compile-time flags go by keyword (MASKED=True). So a new per-head quantity
is one field of Head, a new layout or head mapping one line of _slab, a new mask _visible and
the stage bounds.
"""
import math
import os
from collections import namedtuple
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import autotune, settings
from .validation import with_positive_scale

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
# The kernels pass tuples and namedtuples between jitted functions, which Triton 3.3 brought.
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
TOO_OLD = TRITON_VERSION < (3, 3)

# ----------------------------------------------------------------------------------------------
# Helpers
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
# may see, Tk_slab keys stored), the causal offset (query i sees key j iff j <= i + offset),
# where this head's rows start in packed sequences (q_start, k_start) and in the row statistics
# (stats; stats_h between query heads), the scale in base 2, the dropout draw's seed, head and
# probability, the window's reach, and the constexpr flags: HUGE_SCALE (the softmax guarded for
# scaled scores past 2**30), WINDOW, LENGTHS (per-row key lengths or packed sequences: keys past
# Tk hidden, and a row may see no key at all).
Head = namedtuple("Head", ["Tq", "Tk", "Tk_slab", "offset", "q_start", "k_start", "stats",
                           "stats_h", "qk_scale", "seed", "bh", "dropout_p", "left",
                           "HUGE_SCALE", "WINDOW", "LENGTHS"])

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
          ROWS: tl.constexpr):
    """The Head of query head h of batch entry b (b, h int64; H heads): what every attention kernel's
    tile loops share. The row statistics (LSE, delta) of a head start at b * stride_stats[0] +
    h * stride_stats[1] + q_start."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    q_start, Tq, k_start, Tk, Tk_slab, offset = _rows(SEQ_Q, SEQ_K, b, Tq, Tk, ROWS)
    stats = b * stride_stats[0] + h * stride_stats[1] + q_start
    bh = (b * H + h).to(tl.int32)  # the dropout draw's head
    qk_scale = scale * 1.4426950408889634  # log2(e): exp2 is cheaper than exp; scale > 0
    return Head(Tq, Tk, Tk_slab, offset, q_start, k_start, stats, stride_stats[1], qk_scale,
                seed, bh, dropout_p, left, HUGE_SCALE, WINDOW, ROWS != 0)


@triton.jit
def _member(head, g):
    """The Head of query head g of a grouped-query group whose first query head is head's (the
    dropout draw and the row statistics are per query head; everything else the group
    shares)."""
    return Head(head.Tq, head.Tk, head.Tk_slab, head.offset, head.q_start, head.k_start,
                head.stats + g * head.stats_h, head.stats_h, head.qk_scale, head.seed,
                head.bh + g, head.dropout_p, head.left, head.HUGE_SCALE, head.WINDOW,
                head.LENGTHS)


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
        if head.LENGTHS:
            seen = seen & (offs_n[:, None] < head.Tk)
    else:
        seen = offs_n[None, :] <= offs_m[:, None] + head.offset
        if head.WINDOW:
            seen = seen & (offs_n[None, :] >= offs_m[:, None] + head.offset - head.left)
        if head.LENGTHS:
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
    if head.LENGTHS:
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
    if head.LENGTHS:
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


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

# Lengths vary call to call; specialising on them (divisible by 16 or not) would recompile
# every config for each new length, which is most of the cost of a first call. The head dim D
# is the opposite: a model has one, and it is a constexpr, because a padded head dim (40 of 64)
# masks the loads along D; only a known D lets those loads vectorise, and without vector
# loads Triton cannot pipeline them (bench/compile_report.py showed D=40 unpipelined).
_NO_SPECIALIZE = ["H", "Tq", "Tk", "TQ_BUCKET", "TK_BUCKET", "LEFT", "SPLIT_N"]


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
        s = _dot(q, kT, None, FP32_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, head), s, float("-inf"))
        # With qk_scale > 0 the row maximum of the scaled scores is that of the raw ones,
        # scaled, and the scaling rides on the subtraction: one fused multiply-add per score,
        # rounded once near 0 rather than at the size of the score (the backward does the same).
        m_new = tl.maximum(m_i, _row_max(s, head))
        m_use = m_new
        if (head.WINDOW or head.LENGTHS) and MASKED:
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
            if head.WINDOW or head.LENGTHS:  # a row sees a bad key iff it sees one
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
def _attn_fwd(Q, K, V, O, LSE, SEED, SEQ_Q, SEQ_K, stride_q, stride_k, stride_v, stride_o,
              stride_stats, H, GROUP, Tq, Tk, scale, dropout_p, LEFT, SPLIT_N,
              TQ_BUCKET, TK_BUCKET,  # autotune keys only
              D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
              HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
              SPLIT: tl.constexpr, FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
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
                 DROPOUT, HUGE_SCALE, WINDOW, ROWS)
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


@triton.jit
def _combine_splits(O_PART, LSE_PART, O, LSE, stride_o, H, Tq, ROWS_TOTAL, S, D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    """Merge the S key ranges' outputs of one query row (program r of B * H * Tq): O_PART (S, B,
    H, Tq, D) float32 normalised outputs and LSE_PART (S, B, H, Tq) their base-2 log-sum-exps
    (-inf for a range the row saw nothing of), into O (B, H, Tq, D, strides stride_o) and LSE
    (B, H, Tq): weights 2^(lse_s - lse). A row that saw no key gets zeros and lse -inf; a NaN
    in any range stays NaN."""
    r = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(LSE_PART + offs_s * ROWS_TOTAL + r, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)  # (SPLITS,), 0 for ranges without keys
    total = tl.sum(w, 0)
    o = tl.load(O_PART + (offs_s[:, None] * ROWS_TOTAL + r) * D + offs_d[None, :],
                mask=(offs_s[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    o = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(LSE + r, m + tl.math.log2(total))
    bh = r // Tq
    i = r % Tq
    ptrs = O + (bh // H) * stride_o[0] + (bh % H) * stride_o[1] + i * stride_o[2] + offs_d * stride_o[3]
    tl.store(ptrs, o.to(O.dtype.element_ty), mask=offs_d < D)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

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
        pT = _exp2_weights(tl.fma(_dot(k, qT, None, FP32_PRECISION), head.qk_scale,
                                  -lse2[None, :]), head)
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
        dsT = _to(pT * (dpT - delta_i[None, :]), qT.dtype)
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
                   H, GROUP, Tq, Tk, scale, dropout_p, LEFT,
                   TQ_BUCKET, TK_BUCKET,
                   D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                   HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                   FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
                   DETERMINISTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per key tile of each key/value head (B * H // GROUP of them).
    b, hk, bhk = _batch_and_head(H // GROUP)
    start_n = tl.program_id(0) * BLOCK_N  # key tiles on the left see the most rows: first
    head = _head(b, hk * GROUP, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p,
                 LEFT, DROPOUT, HUGE_SCALE, WINDOW, ROWS)
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
        p = _exp2_weights(tl.fma(_dot(q, kT, None, FP32_PRECISION), head.qk_scale,
                                 -lse2[:, None]), head)
        dp = _dot_x3(do, vT, None, FP32_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _keep(head.seed, head.bh, offs_m, start_n, head.dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - head.dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
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
                 H, GROUP, Tq, Tk, scale, dropout_p, LEFT,
                 TQ_BUCKET, TK_BUCKET,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                 HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                 FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
                 DELTA_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    b, h, bh = _batch_and_head(H)
    head = _head(b, h, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p, LEFT,
                 DROPOUT, HUGE_SCALE, WINDOW, ROWS)
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
                    stride_dv, stride_stats, H, GROUP, Tq, Tk, scale, dropout_p, LEFT,
                    TQ_BUCKET, TK_BUCKET,
                    D: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                    HUGE_SCALE: tl.constexpr, WINDOW: tl.constexpr, ROWS: tl.constexpr,
                    FP32_PRECISION: tl.constexpr, OFFS_64: tl.constexpr,
                    DELTA_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The whole backward of one (batch, key/value head) in one program, for short sequences:
    the dQ pass over the query tiles of each query head of its group (which also stores delta),
    then the dK/dV pass over its key tiles. One launch instead of two; no atomics, each output
    written once: deterministic."""
    b, hk, bhk = _batch_and_head(H // GROUP)
    head = _head(b, hk * GROUP, H, SEQ_Q, SEQ_K, stride_stats, Tq, Tk, scale, SEED, dropout_p,
                 LEFT, DROPOUT, HUGE_SCALE, WINDOW, ROWS)
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


@triton.jit
def _dropout_mask_kernel(SEED, MASK, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the keep-mask the kernels use, as a (B*H, Tq, Tk) int8 tensor: tests only."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), bh, offs_m, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = MASK + bh.to(tl.int64) * Tq * Tk + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ----------------------------------------------------------------------------------------------
# Autotuning and launchers
# ----------------------------------------------------------------------------------------------

# Plain integer helpers for the launch path: triton.cdiv and triton.next_power_of_2 are
# constexpr functions in recent Triton, each call from Python a few microseconds.
def _cdiv(a, b):
    return -(-a // b)


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


# What a launch's config depends on, beside the kernel, dtype and device.
_TUNE_KEY = ("TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "DROPOUT", "FP32_PRECISION", "DETERMINISTIC",
             "SPLIT")


def _fits(conf, args):
    """Configs worth trying: tiles no larger than the problem, small enough for head dim 256
    (two K/V stages of a 128 x 256 tile would not fit in shared memory), and the register-hungry
    ones only for 2-byte rows of at most 64 (wider, they spill: bench/compile_report.py)."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    if bm > max(32, args["TQ_BUCKET"]) or bn > max(32, args["TK_BUCKET"]):
        return False
    if getattr(conf, "narrow_rows_only", False) and args["HEAD_DIM"] * args["Q"].element_size() > 128:
        return False
    return args["HEAD_DIM"] < 256 or bm * bn <= 64 * 32


def _prune(configs, args):
    """The configs that fit `args` (Q and the _TUNE_KEY values), in order; never none."""
    return [c for c in configs if _fits(c, args)] or configs[-1:]


def _cfg(bm, bn, stages, warps, narrow_rows_only=False):
    conf = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
    conf.narrow_rows_only = narrow_rows_only
    return conf


# Few configs on purpose: each costs a compile per (dtype, head dim). The first that fits is
# the fixed choice when autotuning is off; the last fits everything. Registers and spills of
# each, for any GPU target, from a CPU: python bench/compile_report.py
_CONFIGS = {
    # Forward: wide query tiles amortise the Q load.
    "fwd": [_cfg(128, 64, 3, 8), _cfg(128, 128, 3, 8), _cfg(128, 64, 3, 4), _cfg(64, 64, 3, 4),
            _cfg(64, 32, 2, 4)],
    # dK/dV holds two (BLOCK_N, D) accumulators and streams narrow query tiles.
    "dkdv": [_cfg(64, 128, 2, 8, narrow_rows_only=True),
             _cfg(32, 128, 2, 8), _cfg(32, 64, 3, 4), _cfg(32, 32, 1, 4)],
    # dQ holds one (BLOCK_M, D) accumulator and streams narrow key tiles.
    "dq": [_cfg(128, 64, 2, 8), _cfg(128, 32, 3, 4), _cfg(64, 32, 3, 4), _cfg(32, 32, 1, 4)],
    # The short-sequence backward runs both passes with one pair of tiles.
    "fused": [_cfg(64, 64, 2, 8), _cfg(64, 64, 2, 4), _cfg(64, 128, 2, 8), _cfg(32, 32, 1, 4)],
}
_JIT = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "fused": _attn_bwd_fused}
# Keys up to which the deterministic backward is one launch, one program per (batch, head)
# (_attn_bwd_fused); longer sequences take two (dQ, then dK/dV), spread over tiles. A first
# guess to be settled on a GPU: the lecture's T = 256 is at it. Head dims past 64 and float32
# take two as well: with both passes in one kernel, every wgmma config spills there
# (compile_report.py: D = 128 bf16 80 bytes and more, float32 300 and more at any D).
FUSED_MAX_TK = 256


def _fused_backward(Tk, head_dim, dtype):
    """Whether the deterministic backward of Tk keys, this (padded) head dim and this input
    dtype is one launch."""
    return Tk <= FUSED_MAX_TK and head_dim <= 64 and dtype in (torch.float16, torch.bfloat16)
# Under the interpreter, one small fixed tile for every kernel: the test shapes then cross
# several tiles, tails and diagonals (a test swaps in unequal tiles, as the GPU configs have).
_INTERPRET_CONFIG = _cfg(16, 16, 1, 4)
AUTOTUNE = not INTERPRET and os.environ.get("LECTURE_FLASH_AUTOTUNE", "1") != "0"

# One config per specialisation, chosen at its first launch (kernels/autotune.py).
_TUNER = autotune.ConfigCache(("kernel", "dtype", "device") + _TUNE_KEY, autotune=AUTOTUNE)


def _launch(name, tiles_along, args, meta, reset=None):
    """Run kernel `name`; tiles_along = (n, block, bh[, splits]): the grid's first axis is
    n // BLOCK_<M or N> (1 where the block is None: one program per head), the second bh, the
    third splits (1 unless given). reset(), if given, runs before every
    launch (a kernel that accumulates into its output needs it zeroed each time the autotuner
    reruns it)."""
    n, block, bh, *splits = tiles_along
    last = []  # (config, grid, what the JIT returned: the compiled kernel) of the latest launch

    def run(conf):
        if reset is not None:
            reset()
        grid = (1 if block is None else _cdiv(n, conf.kwargs[block]), bh, *(splits or [1]))
        kernel = _JIT[name][grid](
            *args, **meta, **conf.kwargs, num_warps=conf.num_warps, num_stages=conf.num_stages)
        last[:] = [conf, grid, kernel]

    if INTERPRET:
        run(_INTERPRET_CONFIG)
    else:
        key = (name, args[0].dtype, args[0].device, *(meta.get(k) for k in _TUNE_KEY))
        _TUNER.run(key, lambda: _prune(_CONFIGS[name], {"Q": args[0], **meta}), run)
    return last


# CompiledKernel[grid](*every argument) launches a compiled kernel directly (Triton >= 3.3):
# no argument binding, specialisation or cache lookup, which JITFunction.run does on every
# call (about 12 us of Python per launch in Triton 3.x, against about 3 us for this).
_DIRECT = not INTERPRET and hasattr(triton.compiler.CompiledKernel, "__getitem__")
# (kernel name, specialisation key) -> _Plan. The key holds what the launch depends on besides
# its tensors: shapes, strides, dtype, device, scale and flags, and the tensors' 16-byte
# alignment (Triton specialises on it).
_PLANS = {}


class _Plan:
    """One kernel's launch for one specialisation, worked out at its first call: the config,
    the grid and every argument but the tensors. A later call adds its tensors and launches,
    on a GPU through the compiled kernel's own launcher."""

    def __init__(self, name, n_tensors, fixed, meta, launched):
        conf, grid, kernel = launched
        options = dict(num_warps=conf.num_warps, num_stages=conf.num_stages)
        self.jit = lambda tensors: _JIT[name][grid](*tensors, *fixed, **meta, **conf.kwargs, **options)
        self.runner = None
        names = _JIT[name].arg_names[n_tensors:]
        values = {**dict(zip(names, fixed)), **meta, **conf.kwargs}
        if _DIRECT and kernel is not None and all(arg in values for arg in names):
            # The launcher takes every argument in the kernel's order, constexprs included,
            # as JITFunction.run passes them.
            self.tail = tuple(values[arg] for arg in names)
            self.runner = kernel[grid]

    def __call__(self, tensors):
        if self.runner is not None:
            self.runner(*tensors, *self.tail)
        else:
            self.jit(tensors)


def _launch_planned(name, key, tensors, first, reset=None):
    """Launch kernel `name` on `tensors`, its leading arguments (the ones that change from call
    to call). The first call of a key takes the rest from first() -> (tiles_along, fixed
    arguments, meta) and launches through _launch (choosing the config); later calls look the
    plan up. reset(), if given, runs before the launch (before each of the tuner's runs)."""
    plan = _PLANS.get((name, key))
    if plan is None:
        tiles_along, fixed, meta = first()
        _PLANS[(name, key)] = _Plan(name, len(tensors), fixed, meta,
                                    _launch(name, tiles_along, tensors + fixed, meta, reset=reset))
        return
    if reset is not None:
        reset()
    plan(tensors)


def _aligned(*tensors):
    """The tensors' 16-byte alignment, as Triton specialises on it: True when all are aligned
    (one bitwise or, the usual case), else each one's."""
    ptr = 0
    for t in tensors:
        ptr |= t.data_ptr()
    return True if ptr % 16 == 0 else tuple(t.data_ptr() % 16 == 0 for t in tensors)


def autotune_report():
    """What this process's launches chose: one dict per specialisation (kernel, dtype, the
    autotune key's values, the config chosen, and with autotuning on each timed config's median
    milliseconds). bench/run.py puts it in its report."""
    return _TUNER.report()


def _head_dim(D):
    return max(16, _next_pow2(D))  # tl.dot needs K >= 16


def _bucket(T):
    return min(_next_pow2(T), 1 << 16)


def _common(q, k, scale, dropout_p, fp32_precision, left, rows):
    """The meta-arguments every kernel takes, for the (B, H, T, D) views q, k (_as_bhtd);
    left: a sliding window's reach, -1 for none."""
    B, H, _, D = q.shape
    Tq, Tk = _lengths(q, k, rows)
    hd = _head_dim(D)
    return dict(H=H, GROUP=H // k.shape[1], Tq=Tq, Tk=Tk, D=D, scale=scale, dropout_p=dropout_p,
                LEFT=max(left, 0), WINDOW=left >= 0, ROWS=rows.mode,
                TQ_BUCKET=_bucket(Tq), TK_BUCKET=_bucket(Tk), HEAD_DIM=hd, DROPOUT=dropout_p > 0.0,
                HUGE_SCALE=abs(scale) > 1.0,  # see _exp2_weights
                # 16-bit inputs: one specialisation whatever the setting, which is for float32
                FP32_PRECISION=fp32_precision if q.dtype == torch.float32 else "ieee")


_INT32_LIMIT = 2**31  # module-level so a test can lower it and run the int64 path on small shapes


def _offsets_need_64(*tensors):
    """Whether an element offset inside one (batch, head) slab of these (B, H, T, D) tensors can
    reach 2**31. The (B, T, H, D) storage the model uses puts a whole T x H x D block between a
    head's first and last row, so this happens with T * H * D >= 2**31 even in one batch row."""
    for t in tensors:
        _, _, T, D = t.shape
        _, _, stride_t, stride_d = t.stride()
        if (T - 1) * stride_t + (D - 1) * stride_d >= _INT32_LIMIT:
            return True
    return False


# How the kernels find each batch entry's rows (their ROWS constexpr, see _rows): mode, and for
# KEY_LENGTHS / CACHE_LENGTHS seq_k (B,) int32 key lengths, for PACKED seq_q, seq_k (B + 1,)
# int32 cumulative lengths and max_q, max_k the longest sequence's (the grid covers it).
Rows = namedtuple("Rows", ["mode", "seq_q", "seq_k", "max_q", "max_k"])
DENSE_ROWS = Rows(DENSE, None, None, 0, 0)
DENSE_OP_ROWS = (None, None, [DENSE, 0, 0])  # the same, as the custom ops take it


def _as_bhtd(x, rows):
    """The (B, H, T, D) view the kernels index: x itself, or for packed sequences (x of
    (total, H, D)) B batch entries of stride 0, each finding its own first row."""
    if rows.mode != PACKED:
        return x
    return x.transpose(0, 1).unsqueeze(0).expand(rows.seq_q.shape[0] - 1, -1, -1, -1)


def _lengths(q, k, rows):
    """The (Tq, Tk) the grids cover: the tensors' own, or the longest packed sequence's."""
    return (rows.max_q, rows.max_k) if rows.mode == PACKED else (q.shape[2], k.shape[2])


def _new_output(x, rows):
    """An empty tensor shaped as x: (B, H, T, D) stored as (B, T, H, D), the layout the model
    wants back; packed (total, H, D) contiguous."""
    if rows.mode == PACKED:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    B, H, T, D = x.shape
    return x.new_empty_strided((B, H, T, D), (T * H * D, D, H * D, 1))


def _stats_shape(q, rows):
    """The shape of q's row statistics (LSE, delta): (B, H, Tq), or packed (H, total)."""
    return (q.shape[1], q.shape[0]) if rows.mode == PACKED else tuple(q.shape[:3])


def _new_stats(q, rows):
    """Empty float32 row statistics for q (_stats_shape)."""
    return q.new_empty(_stats_shape(q, rows), dtype=torch.float32)


def _stats_strides(stats, rows):
    """(batch, head) strides of the row statistics: packed rows start at their sequence's."""
    return (0, stats.shape[1]) if rows.mode == PACKED else stats.stride()[:2]


def _rows_key(rows):
    """What a plan depends on in rows: the mode, the number of sequences, the longest ones."""
    if rows.mode == DENSE:
        return DENSE
    return (rows.mode, rows.seq_k.shape[0], rows.max_q, rows.max_k)


# An inference forward's log-sum-exp rows, which nothing reads: one buffer per (device, size),
# reused (the kernels write it in stream order; saves an allocation per call).
_SCRATCH_LSE = {}


def _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left=-1, keep_lse=True,
              rows=DENSE_ROWS, splits=1):
    """(o, lse) of the forward kernel, for (B, H, T, D) tensors or, with rows packed, (total,
    H, D) ones; lse (B, H, Tq) or packed (H, total), base 2. With keep_lse=False, lse is a
    scratch buffer that the next inference call overwrites. splits > 1: flash-decoding
    (_fwd_split)."""
    q, scale = with_positive_scale(q, scale)  # the forward kernel needs scale > 0
    if splits > 1:
        return _fwd_split(q, k, v, scale, fp32_precision, left, rows, splits)
    if hopper.applies(q, k, v, dropout_p, left, rows):  # opt-in: LECTURE_FLASH_HOPPER
        return hopper.forward(q, k, v, scale)
    o = _new_output(q, rows)
    if keep_lse:
        lse = _new_stats(q, rows)
    else:
        n = math.prod(_stats_shape(q, rows))
        lse = _SCRATCH_LSE.get((q.device, n))
        if lse is None:
            if len(_SCRATCH_LSE) >= 64:  # e.g. a prefill per prompt length: keep it bounded
                _SCRATCH_LSE.clear()
            lse = _SCRATCH_LSE[(q.device, n)] = torch.empty(n, device=q.device, dtype=torch.float32)
        lse = lse.view(_stats_shape(q, rows))
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, scale,
           dropout_p, fp32_precision, _aligned(q, k, v), left, _rows_key(rows))
    qv, kv, vv, ov = (_as_bhtd(t, rows) for t in (q, k, v, o))
    tensors = (qv, kv, vv, ov, lse, seed if seed is not None else lse,
               _or(rows.seq_q, lse), _or(rows.seq_k, lse))

    def first():
        meta = _common(qv, kv, scale, dropout_p, fp32_precision, left, rows)
        meta.update(OFFS_64=_offsets_need_64(qv, kv, vv, ov), SPLIT=False, SPLIT_N=0)
        return ((meta["Tq"], "BLOCK_M", qv.shape[0] * qv.shape[1]),
                (qv.stride(), kv.stride(), vv.stride(), ov.stride(), _stats_strides(lse, rows)), meta)

    _launch_planned("fwd", key, tensors, first)
    return o, lse


# Flash-decoding's key ranges are multiples of this many keys, so that every forward config's
# BLOCK_N divides them (under the interpreter, every tile the tests use).
_SPLIT_ALIGN = 64 if INTERPRET else 128
_SM_COUNT = {}


def decode_splits(B, H, Tq, Tk, device):
    """How many key ranges flash-decoding splits a step into: enough programs to fill the GPU
    twice over (B * H query tiles alone leave most SMs idle at batch 1), each range at least
    _SPLIT_ALIGN keys. 1: no split."""
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        target = 2 * _SM_COUNT[device]
    else:
        target = 4  # the interpreter: a few, so that the CPU tests cross range edges
    return max(1, min(_cdiv(Tk, _SPLIT_ALIGN), target // (B * H * _cdiv(Tq, 64)), 128))


def _fwd_split(q, k, v, scale, fp32_precision, left, rows, splits):
    """(o, lse) of the forward with the keys split into ranges (flash-decoding): one program per
    (query tile, head, range) writes the range's normalised output and lse in float32, then
    _combine_splits merges each row's ranges. 4-D tensors, rows with lengths (KEY_LENGTHS or
    CACHE_LENGTHS: a row may see no key in a range), no dropout, scale > 0."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    split_n = _cdiv(_cdiv(Tk, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = _cdiv(Tk, split_n)
    o_part = q.new_empty(splits * B, H, Tq, D, dtype=torch.float32)
    lse_part = q.new_empty(splits * B, H, Tq, dtype=torch.float32)
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, scale,
           fp32_precision, _aligned(q, k, v), left, _rows_key(rows), "split", splits)

    def first():
        meta = _common(q, k, scale, 0.0, fp32_precision, left, rows)
        meta.update(OFFS_64=_offsets_need_64(q, k, v, o_part), SPLIT=True, SPLIT_N=split_n)
        return ((Tq, "BLOCK_M", B * H, splits),
                (q.stride(), k.stride(), v.stride(), o_part.stride(), lse_part.stride()[:2]), meta)

    _launch_planned("fwd", key, (q, k, v, o_part, lse_part, lse_part, _or(rows.seq_q, lse_part),
                                 _or(rows.seq_k, lse_part)), first)
    o, lse = _new_output(q, rows), q.new_empty(B, H, Tq, dtype=torch.float32)
    _combine_splits[(B * H * Tq,)](o_part, lse_part, o, lse, o.stride(), H, Tq, B * H * Tq, splits,
                                   D, HEAD_DIM=_next_pow2(D), SPLITS=_next_pow2(splits))
    return o, lse


def _or(t, other):
    """t, or other where t is None (an unused pointer argument still needs a tensor)."""
    return other if t is None else t


def _bwd_impl(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic, dlse=None,
              left=-1, rows=DENSE_ROWS):
    """dq, dk, dv; dlse: the gradient of the forward's (base-2) lse where the caller used it;
    left: the window's reach to the left (-1: no window); rows as the forward's."""
    dq, dk, dv = _new_output(q, rows), _new_output(k, rows), _new_output(v, rows)
    qv, kv, vv, dov, ov, dqv, dkv, dvv = (_as_bhtd(t, rows) for t in (q, k, v, do, o, dq, dk, dv))
    B, H, _, D = qv.shape
    Hk = kv.shape[1]  # Hk < H: grouped-query heads
    Tq, Tk = _lengths(qv, kv, rows)
    head_dim = _head_dim(D)
    # Not deterministic: the dK/dV kernel adds each key tile's share of dQ into float32 rows
    # laid out as the statistics (times the padded head dim), which the reset zeroes before
    # every launch of it; no dQ kernel runs.
    dq_acc = None if deterministic else q.new_empty(*lse.shape, head_dim, dtype=torch.float32)
    # The kernels store delta = rowsum(dO * O) per row; a gradient g of lse (base 2) enters as
    # delta - g / ln(2) (see _delta), so the rows start at -g / ln(2).
    has_dlse = dlse is not None
    delta = torch.empty_like(lse) if not has_dlse else (dlse * -LOG2E).float().contiguous()
    seed = seed if seed is not None else lse
    seqs = (_or(rows.seq_q, lse), _or(rows.seq_k, lse))
    stats = _stats_strides(lse, rows)
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), do.stride(), o.stride(), q.dtype,
           q.device, scale, dropout_p, fp32_precision, _aligned(q, k, v, do, o), has_dlse, left,
           _rows_key(rows))

    def meta(**kernel_flags):
        m = _common(qv, kv, scale, dropout_p, fp32_precision, left, rows)
        m["OFFS_64"] = _offsets_need_64(qv, kv, vv, ov, dov, dqv, dkv, dvv)
        return {**m, **kernel_flags}

    if deterministic and _fused_backward(Tk, head_dim, q.dtype):  # one launch
        _launch_planned("fused", key, (qv, kv, vv, dov, ov, dqv, dkv, dvv, lse, delta, seed, *seqs),
                        lambda: ((1, None, B * Hk),
                                 (qv.stride(), kv.stride(), vv.stride(), dov.stride(), ov.stride(),
                                  dqv.stride(), dkv.stride(), dvv.stride(), stats),
                                 meta(DELTA_OFFSET=has_dlse)))
        return dq, dk, dv
    if deterministic:  # two launches: dQ (which stores delta), then dK/dV
        _launch_planned("dq", key, (qv, kv, vv, dov, ov, dqv, lse, delta, seed, *seqs), lambda: (
            (Tq, "BLOCK_M", B * H), (qv.stride(), kv.stride(), vv.stride(), dov.stride(),
                                     ov.stride(), dqv.stride(), stats), meta(DELTA_OFFSET=has_dlse)))
    else:
        pre_block = 64 if not INTERPRET else 16
        _bwd_preprocess[(_cdiv(Tq, pre_block), B * H)](
            ov, dov, delta, *seqs, ov.stride(), dov.stride(), stats, H, Tq, Tk, D,
            HEAD_DIM=head_dim, ROWS=rows.mode, OFFS_64=_offsets_need_64(ov, dov),
            DELTA_OFFSET=has_dlse, BLOCK_M=pre_block)
    _launch_planned("dkdv", key + (deterministic,), (qv, kv, vv, dov, dkv, dvv, lse, delta, seed,
                    lse if deterministic else dq_acc, *seqs), lambda: (
        (Tk, "BLOCK_N", B * Hk), (qv.stride(), kv.stride(), vv.stride(), dov.stride(),
                                 dkv.stride(), dvv.stride(), stats), meta(DETERMINISTIC=deterministic)),
        reset=None if deterministic else dq_acc.zero_)
    if not deterministic:
        acc = dq_acc[..., :D]
        torch.mul(acc.transpose(0, 1) if rows.mode == PACKED else acc, scale, out=dq)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Registration as torch custom ops (so torch.compile(fullgraph=True) traces through them)
# ----------------------------------------------------------------------------------------------

# The ops take a Rows as its tensors (seq_q, seq_k; None where unused) and [mode, max_q, max_k].
def _rows_of(seq_q, seq_k, shape):
    mode, max_q, max_k = shape
    return DENSE_ROWS if mode == DENSE else Rows(mode, seq_q, seq_k, max_q, max_k)


def _fake_output(x, rows_shape):
    return torch.empty_like(x) if rows_shape[0] == PACKED else _new_output(x, DENSE_ROWS)


@torch.library.custom_op("lecture_flash::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: Optional[torch.Tensor],
            scale: float, dropout_p: float, fp32_precision: str, deterministic: bool, left: int,
            seq_q: Optional[torch.Tensor], seq_k: Optional[torch.Tensor], rows: List[int]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left,
                     rows=_rows_of(seq_q, seq_k, rows))


@_fwd_op.register_fake
def _(q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left, seq_q, seq_k, rows):
    shape = (q.shape[1], q.shape[0]) if rows[0] == PACKED else q.shape[:3]
    return _fake_output(q, rows), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("lecture_flash::bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, seed: Optional[torch.Tensor],
            scale: float, dropout_p: float, fp32_precision: str, deterministic: bool,
            dlse: Optional[torch.Tensor], left: int, seq_q: Optional[torch.Tensor],
            seq_k: Optional[torch.Tensor], rows: List[int]
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic,
                     dlse, left, _rows_of(seq_q, seq_k, rows))


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic, dlse, left,
      seq_q, seq_k, rows):
    return _fake_output(q, rows), _fake_output(k, rows), _fake_output(v, rows)


def _setup_context(ctx, inputs, output):
    q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left, seq_q, seq_k, rows = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed, seq_q, seq_k)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.fp32_precision, ctx.deterministic, ctx.left, ctx.rows = (fp32_precision, deterministic,
                                                                 left, rows)


def _backward(ctx, do, dlse, bwd=None):
    """Gradients of the forward's inputs, through the custom op (or `bwd`, same arguments).
    do or dlse is None where that output was not used (the other one was)."""
    q, k, v, o, lse, seed, seq_q, seq_k = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    if bwd is _bwd_impl:
        rows = (_rows_of(seq_q, seq_k, ctx.rows),)
    else:
        rows = (seq_q, seq_k, ctx.rows)
    dq, dk, dv = (bwd or _bwd_op)(do, q, k, v, o, lse, seed, ctx.scale, ctx.dropout_p,
                                  ctx.fp32_precision, ctx.deterministic, dlse, ctx.left, *rows)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same kernels outside torch.compile, without the custom op's dispatch.

    A custom op called eagerly goes through the dispatcher and torch.library's Python autograd
    layer on every forward and backward; this Function skips both. With the kernel launches
    stubbed out, on a 2-core CPU, the Python path of a forward went from 78 to 20 us and of a
    forward+backward from 334 to 160 us: at the lecture's shapes, more than the kernels take.
    torch.compile still sees only the custom op: flash_attention picks this class only when
    not compiling.
    """

    @staticmethod
    def forward(ctx, q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left,
                seq_q, seq_k, rows):
        o, lse = _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left,
                           rows=_rows_of(seq_q, seq_k, rows))
        _setup_context(ctx, (q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left,
                             seq_q, seq_k, rows), (o, lse))
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a tensor of zeros
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        # With create_graph=True, through the custom op, so that differentiating these gradients
        # again fails loudly (the op has no derivative) instead of treating them as constants.
        return _backward(ctx, do, dlse, _bwd_op if torch.is_grad_enabled() else _bwd_impl)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def supports(q):
    """Why the Triton kernel cannot take q, or None if it can (q is 4-D and validated)."""
    if TOO_OLD:
        return f"triton {triton.__version__} is older than 3.3, which the kernels need"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} is over 256"
    if q.device.type != "cuda" and not INTERPRET:
        return (f"tensors are on {q.device.type}; the Triton kernel needs CUDA "
                "(or TRITON_INTERPRET=1, set before triton is imported, for the CPU interpreter)")
    return None


def draw_seed(device):
    """The dropout seed, drawn from torch's generator for `device` (so manual_seed replays it)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def flash_attention(q, k, v, scale, dropout_p=0.0, deterministic=None, fp32_precision=None,
                    return_lse=False, window_left=None, rows=DENSE_ROWS):
    """Causal attention of validated 4-D (B, H, T, D) tensors through the Triton kernels (or
    with rows packed, (total, H, D) ones: see Rows).
    deterministic, fp32_precision: None for the process default (kernels/settings.py).
    return_lse: also return each row's log-sum-exp of its scaled scores, (B, H, Tq) float32
    ((H, total) packed), natural log, differentiable; -inf for a row that sees no key.
    window_left: query i sees keys from i + offset - window_left on (None: every key up to its
    own position)."""
    left = -1 if window_left is None else int(window_left)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    # The precision matters to float32 inputs only; 16-bit ones always take the one kernel.
    precision = settings.resolve_fp32_precision(fp32_precision) if q.dtype == torch.float32 else "ieee"
    args = (seed, float(scale), float(dropout_p), precision)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        op = _fwd_op if torch.compiler.is_compiling() else _EagerAttention.apply
        o, lse = op(q, k, v, *args, settings.resolve_deterministic(deterministic), left,
                    rows.seq_q, rows.seq_k, [rows.mode, rows.max_q, rows.max_k])
    else:  # inference (sampling): no autograd bookkeeping at all
        splits = _inference_splits(q, k, dropout_p, rows)
        if splits > 1 and rows.mode == DENSE:  # the same mask, as lengths the split path reads
            rows = Rows(KEY_LENGTHS, None, _all_keys(q.shape[0], k.shape[2], q.device), 0, 0)
        o, lse = _fwd_impl(q, k, v, *args, left, keep_lse=return_lse, rows=rows, splits=splits)
    # The kernels keep lse in base 2 (log2(e) times the natural one).
    return (o, lse * LN2) if return_lse else o


# A decode step's queries: up to this many per row take flash-decoding where it pays.
DECODE_MAX_TQ = 16
_ALL_KEYS = {}


def _inference_splits(q, k, dropout_p, rows):
    """How many key ranges an inference call's forward splits into (1: none): a decode step
    (a few queries per row, no dropout, dense rows or key lengths) whose B x H programs would
    leave the GPU idle, as transformers' decode steps and gpt.generate's eager one are."""
    if dropout_p > 0.0 or rows.mode not in (DENSE, KEY_LENGTHS) or q.shape[2] > DECODE_MAX_TQ:
        return 1
    return decode_splits(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)


def _all_keys(B, Tk, device):
    """(B,) int32 lengths of Tk each (kept per shape): dense rows as KEY_LENGTHS rows."""
    key = (B, Tk, device)
    if key not in _ALL_KEYS:
        if len(_ALL_KEYS) >= 256:
            _ALL_KEYS.clear()
        _ALL_KEYS[key] = torch.full((B,), Tk, dtype=torch.int32, device=device)
    return _ALL_KEYS[key]


# torch.compile runs it as it is (a graph break): it launches the kernels itself, outside the
# custom ops, and Dynamo cannot trace a launch.
@torch.compiler.disable
def decode_attention(q, k_cache, v_cache, lengths, scale):
    """Attention of the newest Tq queries of each row to a cache (validated 4-D tensors, scale
    a float) whose row b holds lengths[b] (int32, on the device) valid keys, the queries the
    last Tq of them: the forward kernel with CACHE_LENGTHS rows, its keys split into ranges
    (flash-decoding, decode_splits) where B * H alone would leave the GPU
    idle. Fixed shapes, no host read: a CUDA graph can capture it."""
    B, H, Tq, _ = q.shape
    splits = decode_splits(B, H, Tq, k_cache.shape[2], q.device)
    precision = settings.resolve_fp32_precision(None) if q.dtype == torch.float32 else "ieee"
    o, _ = _fwd_impl(q, k_cache, v_cache, None, float(scale), 0.0, precision, keep_lse=False,
                     rows=Rows(CACHE_LENGTHS, None, lengths, 0, 0), splits=splits)
    return o


def dropout_keep_mask(seed, B, H, Tq, Tk, dropout_p, block=(16, 16)):
    """The (B, H, Tq, Tk) bool keep-mask the kernels draw for this seed: for tests. `block` is
    the (rows, keys) tile it is drawn in; the mask must not depend on it."""
    bm, bn = block
    mask = torch.empty(B * H, Tq, Tk, device=seed.device, dtype=torch.int8)
    grid = (_cdiv(Tq, bm), _cdiv(Tk, bn), B * H)
    _dropout_mask_kernel[grid](seed, mask, Tq, Tk, dropout_p, BLOCK_M=bm, BLOCK_N=bn)
    return mask.view(B, H, Tq, Tk).bool()


# The opt-in sm_90 forward (LECTURE_FLASH_HOPPER) builds on this module's jitted helpers, so it
# is imported once they exist.
from . import hopper  # noqa: E402
