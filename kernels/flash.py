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
import os
import sys
import warnings
from typing import List, Optional, Tuple

import torch
import triton

from . import devices, flash_configs, flash_decode, flash_launch, hopper, settings
from .flash_launch import (DENSE_OP_ROWS, DENSE_ROWS, LOG2E, Rows, _cdiv, _new_output,  # noqa: F401
                           autotune_report)
from .flash_tiles import (CACHE_LENGTHS, DENSE, INTERPRET, KEY_LENGTHS, PACKED,  # noqa: F401
                          _dropout_mask_kernel)
from .masking import guarded_attention_with_mask
from .packing import pad, unpad, unpad_rows
from .reference import causal_mask, key_length_mask, packed_mask
from .validation import with_positive_scale

LN2 = 0.6931471805599453
# The kernels pass tuples and namedtuples between jitted functions, which Triton 3.3 brought.
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
TOO_OLD = TRITON_VERSION < (3, 3)


# ----------------------------------------------------------------------------------------------
# The guard: a kernel that cannot compile or load here never crashes a call
# ----------------------------------------------------------------------------------------------

# (device, dtype, head dim) -> why the kernels cannot run it on this device: one of them failed
# to compile or load at its first launch. From then on the dispatch sends such calls to
# PyTorch's SDPA (supports() says why); a call already past it (the failing one itself, or a
# compiled graph's op) is computed by the reference's arithmetic. Warned once; never retried.
FAILED = {}
_ON_FAILURE = []  # what to forget when a specialisation fails (dispatch.py's cached routes)


def on_failure(forget):
    """Call forget() whenever a specialisation joins FAILED."""
    _ON_FAILURE.append(forget)


def _where(device):
    if device.type != "cuda":
        return f"{device.type} (Triton's interpreter)"
    return devices.target_of(device).describe()


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.sep + "torch" + os.sep


def _caller_level():
    """warnings.warn's stacklevel for _failure's caller: the first frame outside this package
    and torch (the user's code)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or _TORCH in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _failure(q, error, strict):
    """Record that q's specialisation cannot run here (warning once), then raise ValueError if
    the caller asked for the Triton backend by name (strict)."""
    key = (q.device, q.dtype, q.shape[-1])
    if key not in FAILED:
        FAILED[key] = (f"on {_where(q.device)}, {str(q.dtype).replace('torch.', '')} at head dim "
                       f"{q.shape[-1]}, {error}")
        warnings.warn(f"lecture_flash: the Triton kernels cannot run here ({FAILED[key]}); such "
                      "calls go to PyTorch's attention from now on", stacklevel=_caller_level())
        for forget in _ON_FAILURE:
            forget()
    if strict:
        raise ValueError(f"backend='triton' cannot run here: {FAILED[key]}") from error


def _math_forward(q, k, v, seed, scale, dropout_p, left, rows, right=0, softcap=0.0, sinks=None):
    """(o, lse in base 2) as the kernels define them, by the reference's arithmetic (float32),
    for a call the kernels cannot run: any rows, mask, softcap, sinks, grouped heads, and the
    very dropout mask the kernels draw from `seed` (so a backward recomputing it matches)."""
    window, right = (None if left < 0 else left), (None if right < 0 else right)
    packed = rows.mode == PACKED
    qm, km, vm = q, k, v
    if packed:  # as padded sequences: (B, H, longest, D)
        qm = pad(q, rows.seq_q, rows.max_q)
        km, vm = pad(k, rows.seq_k, rows.max_k), pad(v, rows.seq_k, rows.max_k)
        mask = packed_mask(rows.seq_q, rows.seq_k, rows.max_q, rows.max_k, window, right)
    elif rows.mode == DENSE:
        mask = causal_mask(q.shape[2], k.shape[2], q.device, window, right)
    else:
        mask = key_length_mask(q, k, rows.seq_k, window, cache=rows.mode == CACHE_LENGTHS,
                               right=right)
    keep = None
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, qm.shape[0], qm.shape[1], qm.shape[2], km.shape[2], dropout_p)
    o, lse = guarded_attention_with_mask(qm, km, vm, mask, scale, dropout_p, keep, softcap, sinks)
    lse = lse.float() * LOG2E
    if packed:
        o, lse = unpad(o, rows.seq_q, q.shape[0]), unpad_rows(lse, rows.seq_q, q.shape[0])
    return o, lse


def _math_backward(do, q, k, v, seed, scale, dropout_p, dlse, left, rows, right=0, softcap=0.0,
                   sinks=None):
    """dq, dk, dv of _math_forward (with dlse, the gradient of its base-2 lse, where used)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        o, lse = _math_forward(*inputs, seed, scale, dropout_p, left, rows, right, softcap,
                               None if sinks is None else sinks.detach())
        outputs, grads = [o], [do]
        if dlse is not None:
            outputs.append(lse)
            grads.append(dlse)
        return torch.autograd.grad(outputs, inputs, grads)


def _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left=-1, keep_lse=True,
              rows=DENSE_ROWS, splits=1, strict=False, right=0, softcap=0.0, sinks=None):
    """(o, lse) of the forward (flash_launch.forward has the details), by the kernel that takes
    the call: flash-decoding for splits > 1 (flash_decode.py), the opt-in Hopper forward where
    it applies (hopper.py), else the portable one (flash_fwd.py); by _math_forward where the
    kernels cannot run (the guard above)."""
    if not FAILED or (q.device, q.dtype, q.shape[-1]) not in FAILED:
        try:
            qs, s = with_positive_scale(q, scale)  # the forward kernels need scale > 0
            if splits > 1:
                return flash_decode.forward_split(qs, k, v, s, fp32_precision, left, rows, splits,
                                                  right, softcap)
            if hopper.applies(qs, k, v, dropout_p, left, rows, right, softcap, sinks):
                return hopper.forward(qs, k, v, s)  # opt-in: LECTURE_FLASH_HOPPER
            return flash_launch.forward(qs, k, v, seed, s, dropout_p, fp32_precision, left,
                                        keep_lse, rows, right, softcap, sinks)
        except flash_launch.KernelUnavailable as e:
            _failure(q, e, strict)
    return _math_forward(q, k, v, seed, scale, dropout_p, left, rows, right, softcap, sinks)


def _bwd_impl(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic,
              dlse=None, left=-1, rows=DENSE_ROWS, strict=False, right=0, softcap=0.0,
              sinks=None):
    """dq, dk, dv by the backward kernels (flash_launch.backward), or where they cannot run by
    _math_backward (the guard above)."""
    if not FAILED or (q.device, q.dtype, q.shape[-1]) not in FAILED:
        try:
            return flash_launch.backward(do, q, k, v, o, lse, seed, scale, dropout_p,
                                         fp32_precision, deterministic, dlse, left, rows, right,
                                         softcap)
        except flash_launch.KernelUnavailable as e:
            _failure(q, e, strict)
    return _math_backward(do, q, k, v, seed, scale, dropout_p, dlse, left, rows, right, softcap,
                          sinks)


def sink_grad(do, o, lse, dlse, sinks, packed):
    """The gradient of the sinks (H,): each row's sink weight p = exp(sink - lse) times the
    gradient its logit receives, dlse - rowsum(dO * O) (the sink's value is zero, so it only
    draws weight from the other keys). lse and dlse in base 2, as the kernels keep them;
    packed: the rows are (H, total) and dO, O (total, H, D)."""
    delta = (do.float() * o.float()).sum(-1)  # (B, H, Tq), or (total, H) packed
    sink = sinks.float().view(-1, 1)  # (H, 1): per head, over the rows
    if packed:
        delta = delta.transpose(0, 1)
    else:
        sink = sink.unsqueeze(0)
    grad = -delta if dlse is None else dlse.float() * LOG2E - delta
    p = torch.exp2(sink * LOG2E - lse)  # a row that saw no key: 1 (its lse is the sink)
    return (p * grad).sum(dim=(1,) if packed else (0, 2)).to(sinks.dtype)


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
            seq_q: Optional[torch.Tensor], seq_k: Optional[torch.Tensor], rows: List[int],
            right: int = 0, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left,
                     rows=_rows_of(seq_q, seq_k, rows), right=right, softcap=softcap, sinks=sinks)


@_fwd_op.register_fake
def _(q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left, seq_q, seq_k, rows,
      right=0, softcap=0.0, sinks=None):
    shape = (q.shape[1], q.shape[0]) if rows[0] == PACKED else q.shape[:3]
    return _fake_output(q, rows), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("lecture_flash::bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, seed: Optional[torch.Tensor],
            scale: float, dropout_p: float, fp32_precision: str, deterministic: bool,
            dlse: Optional[torch.Tensor], left: int, seq_q: Optional[torch.Tensor],
            seq_k: Optional[torch.Tensor], rows: List[int], right: int = 0, softcap: float = 0.0,
            sinks: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic,
                     dlse, left, _rows_of(seq_q, seq_k, rows), right=right, softcap=softcap,
                     sinks=sinks)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic, dlse, left,
      seq_q, seq_k, rows, right=0, softcap=0.0, sinks=None):
    return _fake_output(q, rows), _fake_output(k, rows), _fake_output(v, rows)


def _setup_context(ctx, inputs, output):
    (q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left, seq_q, seq_k, rows,
     right, softcap, sinks) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed, seq_q, seq_k, sinks)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.fp32_precision, ctx.deterministic, ctx.left, ctx.rows = (fp32_precision, deterministic,
                                                                 left, rows)
    ctx.right, ctx.softcap = right, softcap


def _backward(ctx, do, dlse, bwd=None):
    """Gradients of the forward's inputs, through the custom op (or `bwd`, same arguments).
    do or dlse is None where that output was not used (the other one was)."""
    q, k, v, o, lse, seed, seq_q, seq_k, sinks = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    args = (do, q, k, v, o, lse, seed, ctx.scale, ctx.dropout_p, ctx.fp32_precision,
            ctx.deterministic, dlse, ctx.left)
    if bwd is _bwd_impl:
        dq, dk, dv = _bwd_impl(*args, _rows_of(seq_q, seq_k, ctx.rows),
                               strict=getattr(ctx, "strict", False), right=ctx.right,
                               softcap=ctx.softcap, sinks=sinks)
    else:
        dq, dk, dv = (bwd or _bwd_op)(*args, seq_q, seq_k, ctx.rows, ctx.right, ctx.softcap, sinks)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[-1]:
        dsinks = sink_grad(do, o, lse, dlse, sinks, ctx.rows[0] == PACKED)
    return dq, dk, dv, *[None] * (len(ctx.needs_input_grad) - 4), dsinks


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
                seq_q, seq_k, rows, strict, right, softcap, sinks):
        o, lse = _fwd_impl(q, k, v, seed, scale, dropout_p, fp32_precision, left,
                           rows=_rows_of(seq_q, seq_k, rows), strict=strict, right=right,
                           softcap=softcap, sinks=sinks)
        _setup_context(ctx, (q, k, v, seed, scale, dropout_p, fp32_precision, deterministic, left,
                             seq_q, seq_k, rows, right, softcap, sinks), (o, lse))
        ctx.strict = strict  # backend="triton" by name: a kernel that cannot run raises
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
    failed = FAILED.get((q.device, q.dtype, q.shape[-1]))  # a kernel failed to load here
    if failed is not None or q.device.type != "cuda":
        return failed
    return flash_configs.unsupported(devices.target_of(q.device), str(q.dtype).replace("torch.", ""),
                                     flash_launch._head_dim(q.shape[-1]), q.element_size())


def declines(q):
    """Why backend="auto" leaves the Triton kernels out for q though they can run it, or None
    (flash_configs.declined: sm_75)."""
    return flash_configs.declined(devices.target_of(q.device)) if q.device.type == "cuda" else None


def _precision(q, fp32_precision=None):
    """The dot precision of one call: for float32 inputs the call's, else the process default
    (settings.py); 16-bit inputs always take the one kernel. On ROCm "ieee" where the default
    would be tf32: AMD's Triton has no tf32 dots (its float32 dots take "ieee", "bf16x3" or
    "bf16x6"), and a call asking for tf32 by name there is refused."""
    if q.dtype != torch.float32:
        return "ieee"
    precision = settings.resolve_fp32_precision(fp32_precision)
    if precision == "tf32" and torch.version.hip is not None:
        if fp32_precision == "tf32":
            raise ValueError("fp32_precision='tf32': ROCm's Triton has no tf32 dots; pass 'ieee' "
                             "(or leave it: PyTorch's 'high' precision maps to 'ieee' there)")
        return "ieee"
    return precision


def draw_seed(device):
    """The dropout seed, drawn from torch's generator for `device` (so manual_seed replays it)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def flash_attention(q, k, v, scale, dropout_p=0.0, deterministic=None, fp32_precision=None,
                    return_lse=False, window_left=None, rows=DENSE_ROWS, strict=False,
                    window_right=0, softcap=0.0, sinks=None):
    """Causal attention of validated 4-D (B, H, T, D) tensors through the Triton kernels (or
    with rows packed, (total, H, D) ones: see Rows).
    deterministic, fp32_precision: None for the process default (kernels/settings.py).
    return_lse: also return each row's log-sum-exp of its scaled scores, (B, H, Tq) float32
    ((H, total) packed), natural log, differentiable; -inf for a row that sees no key.
    window_left, window_right: query i sees keys i + offset - window_left .. i + offset +
    window_right (None: no bound on that side; window_right 0 is causal).
    softcap: 0 or > 0 (scores softcap * tanh(s / softcap)); sinks: None or (H,) logits, their
    gradient returned to them.
    strict: a kernel that cannot compile or load here raises ValueError (backend="triton" by
    name) instead of the call being computed by PyTorch (the guard)."""
    left = -1 if window_left is None else int(window_left)
    right = -1 if window_right is None else int(window_right)
    softcap = float(softcap)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    args = (seed, float(scale), float(dropout_p), _precision(q, fp32_precision))
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (sinks is not None and sinks.requires_grad))):
        rows_args = (rows.seq_q, rows.seq_k, [rows.mode, rows.max_q, rows.max_k])
        deterministic = settings.resolve_deterministic(deterministic)
        if torch.compiler.is_compiling():
            o, lse = _fwd_op(q, k, v, *args, deterministic, left, *rows_args, right, softcap, sinks)
        else:
            o, lse = _EagerAttention.apply(q, k, v, *args, deterministic, left, *rows_args, strict,
                                           right, softcap, sinks)
    else:  # inference (sampling): no autograd bookkeeping at all
        splits = flash_decode.inference_splits(q, k, dropout_p, rows, sinks)
        if splits > 1 and rows.mode == DENSE:  # the same mask, as lengths the split path reads
            rows = Rows(KEY_LENGTHS, None, flash_decode.all_keys(q.shape[0], k.shape[2], q.device),
                        0, 0)
        o, lse = _fwd_impl(q, k, v, *args, left, keep_lse=return_lse, rows=rows, splits=splits,
                           strict=strict, right=right, softcap=softcap, sinks=sinks)
    # The kernels keep lse in base 2 (log2(e) times the natural one).
    return (o, lse * LN2) if return_lse else o


# torch.compile runs it as it is (a graph break): it launches the kernels itself, outside the
# custom ops, and Dynamo cannot trace a launch.
@torch.compiler.disable
def decode_attention(q, k_cache, v_cache, lengths, scale, strict=False, window_left=None,
                     window_right=0, softcap=0.0, return_lse=False, num_splits=0):
    """Attention of the newest Tq queries of each row to a cache (validated 4-D tensors, scale
    a float) whose row b holds lengths[b] (int32, on the device) valid keys, the queries the
    last Tq of them: the forward kernel with CACHE_LENGTHS rows, its keys split into ranges
    (flash-decoding, decode_splits) where B * H alone would leave the GPU
    idle. Fixed shapes, no host read: a CUDA graph can capture it. window_left, window_right,
    softcap, return_lse: as flash_attention's; num_splits: the number of key ranges (0: as
    decode_splits chooses)."""
    B, H, Tq, _ = q.shape
    splits = num_splits or flash_decode.decode_splits(B, H, Tq, k_cache.shape[2], q.device)
    left = -1 if window_left is None else int(window_left)
    right = -1 if window_right is None else int(window_right)
    o, lse = _fwd_impl(q, k_cache, v_cache, None, float(scale), 0.0, _precision(q), left,
                       keep_lse=return_lse, rows=Rows(CACHE_LENGTHS, None, lengths, 0, 0),
                       splits=splits, strict=strict, right=right, softcap=float(softcap))
    return (o, lse * LN2) if return_lse else o


def dropout_keep_mask(seed, B, H, Tq, Tk, dropout_p, block=(16, 16)):
    """The (B, H, Tq, Tk) bool keep-mask the kernels draw for this seed: for tests. `block` is
    the (rows, keys) tile it is drawn in; the mask must not depend on it."""
    bm, bn = block
    mask = torch.empty(B * H, Tq, Tk, device=seed.device, dtype=torch.int8)
    grid = (_cdiv(Tq, bm), _cdiv(Tk, bn), B * H)
    _dropout_mask_kernel[grid](seed, mask, Tq, Tk, dropout_p, BLOCK_M=bm, BLOCK_N=bn)
    return mask.view(B, H, Tq, Tk).bool()
