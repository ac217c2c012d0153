"""Flash-decoding: a decode step's few queries per row against many keys, its keys split into
ranges that run side by side (a third grid axis of the forward kernel, SPLIT) and are merged
after (_combine_splits), where B * H programs alone would leave most of the GPU idle.
"""
import torch
import triton
import triton.language as tl

from .flash_launch import (_aligned, _cdiv, _common, _launch_planned, _new_output, _next_pow2,
                           _offsets_need_64, _or, _rows_key, first_launch)
from .flash_tiles import DENSE, INTERPRET, KEY_LENGTHS


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


def forward_split(q, k, v, scale, fp32_precision, left, rows, splits, right=0, softcap=0.0):
    """(o, lse) of the forward with the keys split into ranges (flash-decoding): one program per
    (query tile, head, range) writes the range's normalised output and lse in float32, then
    _combine_splits merges each row's ranges. 4-D tensors, rows with lengths (KEY_LENGTHS or
    CACHE_LENGTHS: a row may see no key in a range), no dropout, no sinks, scale > 0."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    split_n = _cdiv(_cdiv(Tk, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = _cdiv(Tk, split_n)
    o_part = q.new_empty(splits * B, H, Tq, D, dtype=torch.float32)
    lse_part = q.new_empty(splits * B, H, Tq, dtype=torch.float32)
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, scale,
           fp32_precision, _aligned(q, k, v), left, _rows_key(rows), "split", splits, right, softcap)

    def first():
        meta = _common(q, k, scale, 0.0, fp32_precision, left, rows, right, softcap)
        meta.update(OFFS_64=_offsets_need_64(q, k, v, o_part), SPLIT=True, SPLIT_N=split_n,
                    HAS_SINKS=False)
        return ((Tq, "BLOCK_M", B * H, splits),
                (q.stride(), k.stride(), v.stride(), o_part.stride(), lse_part.stride()[:2]), meta)

    _launch_planned("fwd", key, (q, k, v, o_part, lse_part, lse_part, _or(rows.seq_q, lse_part),
                                 _or(rows.seq_k, lse_part), lse_part), first)
    o, lse = _new_output(q, rows), q.new_empty(B, H, Tq, dtype=torch.float32)
    first_launch("combine", lambda: _combine_splits[(B * H * Tq,)](
        o_part, lse_part, o, lse, o.stride(), H, Tq, B * H * Tq, splits, D,
        HEAD_DIM=_next_pow2(D), SPLITS=_next_pow2(splits)))
    return o, lse


# A decode step's queries: up to this many per row take flash-decoding where it pays.
DECODE_MAX_TQ = 16
_ALL_KEYS = {}


def inference_splits(q, k, dropout_p, rows, sinks=None):
    """How many key ranges an inference call's forward splits into (1: none): a decode step
    (a few queries per row, no dropout or sinks, dense rows or key lengths) whose B x H programs
    would leave the GPU idle, as transformers' decode steps and gpt.generate's eager one are."""
    if (dropout_p > 0.0 or sinks is not None or rows.mode not in (DENSE, KEY_LENGTHS)
            or q.shape[2] > DECODE_MAX_TQ):
        return 1
    key = (q.shape, k.shape[2], q.device)
    splits = _INFERENCE_SPLITS.get(key)
    if splits is None:  # (a model asks about one shape per layer and step: kept)
        if len(_INFERENCE_SPLITS) >= 4096:
            _INFERENCE_SPLITS.clear()
        splits = _INFERENCE_SPLITS[key] = decode_splits(q.shape[0], q.shape[1], q.shape[2],
                                                        k.shape[2], q.device)
    return splits


_INFERENCE_SPLITS = {}


def all_keys(B, Tk, device):
    """(B,) int32 lengths of Tk each (kept per shape): dense rows as KEY_LENGTHS rows."""
    key = (B, Tk, device)
    if key not in _ALL_KEYS:
        if len(_ALL_KEYS) >= 256:
            _ALL_KEYS.clear()
        _ALL_KEYS[key] = torch.full((B,), Tk, dtype=torch.int32, device=device)
    return _ALL_KEYS[key]
