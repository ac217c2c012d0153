"""Fused causal attention in Triton: FlashAttention-2's algorithm, forward and backward, as
torch custom ops with autograd, and the functions the dispatch (kernels/dispatch.py) calls.

The Triton code, by role, each file read top to bottom:
    flash_tiles.py    the jitted pieces every kernel shares: rounding, dots, the dropout draw,
                      how a program finds its head, rows and tiles, the causal stages
    flash_fwd.py      the forward kernel
    flash_bwd.py      the backward kernels (dQ, dK/dV, the one-launch short-sequence backward)
    flash_decode.py   flash-decoding: keys split into ranges, merged after
    flash_launch.py   configs, autotuning, launch plans; the host-side forward and backward
    hopper.py         the opt-in sm_90 forward (TMA), on flash_tiles' pieces
    flash.py          this file: the custom ops, autograd, the public functions

Notation: B batch, H heads, Tq queries, Tk keys (Tq <= Tk), D head dim. The causal mask is
bottom-right aligned: query i sees key j iff j <= i + (Tk - Tq).
"""
from typing import List, Optional, Tuple

import torch
import triton

from . import flash_decode, flash_launch, hopper, settings
from .flash_launch import DENSE_OP_ROWS, DENSE_ROWS, Rows, _cdiv, _new_output, autotune_report  # noqa: F401
from .flash_tiles import (CACHE_LENGTHS, DENSE, INTERPRET, KEY_LENGTHS, PACKED,  # noqa: F401
                          _dropout_mask_kernel)
from .validation import with_positive_scale

LN2 = 0.6931471805599453
# The kernels pass tuples and namedtuples between jitted functions, which Triton 3.3 brought.
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
TOO_OLD = TRITON_VERSION < (3, 3)


# ----------------------------------------------------------------------------------------------
# Registration as torch custom ops (so torch.compile(fullgraph=True) traces through them)
# ----------------------------------------------------------------------------------------------

def _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left=-1, keep_lse=True,
              rows=DENSE_ROWS, splits=1):
    """(o, lse) of the forward (flash_launch.forward has the details), by the kernel that takes
    the call: flash-decoding for splits > 1 (flash_decode.py), the opt-in Hopper forward where
    it applies (hopper.py), else the portable one (flash_fwd.py)."""
    q, scale = with_positive_scale(q, scale)  # the forward kernels need scale > 0
    if splits > 1:
        return flash_decode.forward_split(q, k, v, scale, fp32_precision, left, rows, splits)
    if hopper.applies(q, k, v, dropout_p, left, rows):  # opt-in: LECTURE_FLASH_HOPPER
        return hopper.forward(q, k, v, scale)
    return flash_launch.forward(q, k, v, seed, scale, dropout_p, fp32_precision, left, keep_lse,
                                rows)


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
    return flash_launch.backward(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic,
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
    if bwd is flash_launch.backward:
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
        return _backward(ctx, do, dlse, _bwd_op if torch.is_grad_enabled() else flash_launch.backward)


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
        splits = flash_decode.inference_splits(q, k, dropout_p, rows)
        if splits > 1 and rows.mode == DENSE:  # the same mask, as lengths the split path reads
            rows = Rows(KEY_LENGTHS, None, flash_decode.all_keys(q.shape[0], k.shape[2], q.device),
                        0, 0)
        o, lse = _fwd_impl(q, k, v, *args, left, keep_lse=return_lse, rows=rows, splits=splits)
    # The kernels keep lse in base 2 (log2(e) times the natural one).
    return (o, lse * LN2) if return_lse else o


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
    splits = flash_decode.decode_splits(B, H, Tq, k_cache.shape[2], q.device)
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
