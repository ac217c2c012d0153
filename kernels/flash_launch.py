"""Launching the kernels of flash_fwd.py and flash_bwd.py: the configs each may take, the
choice among them (kernels/autotune.py picks one per specialisation), the grids, and the
host-side forward and backward that flash.py's custom ops run.

The first call of each specialisation (shapes, strides, dtype, scale, flags, alignment) works
its launch out once: the config, the grid and every non-tensor argument, kept as a _Plan; later
calls pass their tensors to the compiled kernel's own launcher, with no argument binding or
cache lookup per call.
"""
import os
from collections import namedtuple

import torch
import triton

from . import autotune, devices, flash_configs
from .flash_configs import _cfg
from .flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_fused, _bwd_preprocess
from .flash_fwd import _attn_fwd
from .flash_tiles import DENSE, INTERPRET, PACKED

LOG2E = 1.4426950408889634

try:  # Triton's own errors (compilation, out of resources, ptxas) derive from TritonError
    from triton.errors import TritonError
except ImportError:  # Triton < 3.4 keeps it here
    from triton.compiler.errors import TritonError


class KernelUnavailable(RuntimeError):
    """A kernel failed to compile or load for this GPU at its first launch: its config needs
    more than the device has, or Triton cannot build it for this architecture. flash.py's
    guard sends the call elsewhere (`kernel`: which one; the cause is chained)."""

    def __init__(self, kernel, cause):
        first = (str(cause).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
        super().__init__(f"the {kernel} kernel failed to compile or load: "
                         f"{type(cause).__name__}{': ' + first[:200] if first else ''}")
        self.kernel = kernel


def first_launch(kernel, launch):
    """launch(), with what a compile or load can raise turned into KernelUnavailable: Triton's
    errors, and the RuntimeErrors of MLIR passes and backends (not out-of-memory)."""
    try:
        return launch()
    except torch.cuda.OutOfMemoryError:
        raise
    except (TritonError, RuntimeError) as e:
        raise KernelUnavailable(kernel, e) from e

# Plain integer helpers for the launch path: triton.cdiv and triton.next_power_of_2 are
# constexpr functions in recent Triton, each call from Python a few microseconds.
def _cdiv(a, b):
    return -(-a // b)


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


# What a launch's config depends on, beside the kernel, dtype and device.
_TUNE_KEY = ("TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "DROPOUT", "FP32_PRECISION", "DETERMINISTIC",
             "SPLIT")


_JIT = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "fused": _attn_bwd_fused}
# Keys up to which the deterministic backward is one launch, one program per (batch, head)
# (_attn_bwd_fused); longer sequences take two (dQ, then dK/dV), spread over tiles. A first
# guess to be settled on a GPU: the lecture's T = 256 is at it. Head dims past 64 and float32
# take two as well: with both passes in one kernel, every wgmma config spills there
# (compile_report.py: D = 128 bf16 80 bytes and more, float32 300 and more at any D).
FUSED_MAX_TK = 256


def _fused_backward(Tk, head_dim, dtype, device=None):
    """Whether the deterministic backward of Tk keys, this (padded) head dim and this input
    dtype is one launch (on `device`'s GPU, where a config of the fused kernel fits)."""
    if not (Tk <= FUSED_MAX_TK and head_dim <= 64 and dtype in (torch.float16, torch.bfloat16)):
        return False
    target = None if device is None else _target(device)
    return target is None or bool(flash_configs.candidates(
        "fused", dtype, head_dim, 2, _bucket(Tk), _bucket(Tk), target))
# Under the interpreter, one small fixed tile for every kernel: the test shapes then cross
# several tiles, tails and diagonals (a test swaps in unequal tiles, as the GPU configs have).
_INTERPRET_CONFIG = _cfg(16, 16, 1, 4)
# Timing every candidate at a specialisation's first launch compiles every one of them (tens of
# seconds on a small GPU): opt-in. Off, the first candidate that fits this GPU is compiled
# alone (flash_configs.candidates).
AUTOTUNE = not INTERPRET and os.environ.get("LECTURE_FLASH_AUTOTUNE", "0") == "1"

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
        q = args[0]
        key = (name, q.dtype, q.device, *(meta.get(k) for k in _TUNE_KEY))
        _TUNER.run(key, lambda: _candidates(name, q, meta), run)
    return last


def _candidates(name, q, meta):
    """The configs kernel `name` may take for this launch on q's GPU (flash_configs.py); a
    kernel none of whose configs fits is not launched."""
    found = flash_configs.candidates(name, q.dtype, meta["HEAD_DIM"], q.element_size(),
                                     meta["TQ_BUCKET"], meta["TK_BUCKET"], _target(q.device))
    if not found:
        raise KernelUnavailable(name, ValueError(
            f"no config fits this GPU ({_target(q.device).describe()})"))
    return found


def _target(device):
    return devices.target_of(device) if device.type == "cuda" else None


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
        launched = first_launch(name, lambda: _launch(name, tiles_along, tensors + fixed, meta,
                                                      reset=reset))
        _PLANS[(name, key)] = _Plan(name, len(tensors), fixed, meta, launched)
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
    device and its arch, the autotune key's values, the config chosen, and with autotuning on
    each timed config's median milliseconds). bench/run.py puts it in its report, and
    bench/tuned_configs.py makes flash_tuned.py of such reports."""
    rows = _TUNER.report()
    for row in rows:
        device = torch.device(row["device"])
        row["arch"] = _target(device).label if device.type == "cuda" else None
    return rows


def _head_dim(D):
    return max(16, _next_pow2(D))  # tl.dot needs K >= 16


def _bucket(T):
    return min(_next_pow2(T), 1 << 16)


def _common(q, k, scale, dropout_p, fp32_precision, left, rows, right=0, softcap=0.0):
    """The meta-arguments every kernel takes, for the (B, H, T, D) views q, k (_as_bhtd);
    left, right: a window's reach on either side of the diagonal, -1 for no bound (right 0:
    causal); softcap: 0 for none."""
    B, H, _, D = q.shape
    Tq, Tk = _lengths(q, k, rows)
    hd = _head_dim(D)
    # The kernels' mask is causal with an offset: a right side moves the diagonal right by
    # `shift` (past every key for full attention) and the left edge counts from there.
    shift = right if right >= 0 else Tq + Tk
    return dict(H=H, GROUP=H // k.shape[1], Tq=Tq, Tk=Tk, D=D, scale=scale, dropout_p=dropout_p,
                LEFT=max(left, 0) + shift, WINDOW=left >= 0, ROWS=rows.mode,
                SHIFT=shift, RIGHT=shift > 0, CAP=softcap / scale if softcap else 1.0,
                SOFTCAP=softcap > 0.0,
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


# An inference forward's log-sum-exp rows, which nothing reads: one buffer per (device, shape),
# reused (the kernels write it in stream order; saves an allocation per call).
_SCRATCH_LSE = {}


def forward(q, k, v, seed, scale, dropout_p, fp32_precision, left=-1, keep_lse=True,
            rows=DENSE_ROWS, right=0, softcap=0.0, sinks=None):
    """(o, lse) of the forward kernel, for (B, H, T, D) tensors or, with rows packed, (total,
    H, D) ones; lse (B, H, Tq) or packed (H, total), base 2; scale > 0. With keep_lse=False,
    lse is a scratch buffer that the next inference call overwrites. right, softcap as
    _common's; sinks: None or (H,) logits."""
    o = _new_output(q, rows)
    if keep_lse:
        lse = _new_stats(q, rows)
    else:
        shape = _stats_shape(q, rows)
        lse = _SCRATCH_LSE.get((q.device, shape))
        if lse is None:
            if len(_SCRATCH_LSE) >= 64:  # e.g. a prefill per prompt length: keep it bounded
                _SCRATCH_LSE.clear()
            lse = _SCRATCH_LSE[(q.device, shape)] = torch.empty(shape, device=q.device,
                                                               dtype=torch.float32)
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, scale,
           dropout_p, fp32_precision, _aligned(q, k, v), left, _rows_key(rows), right, softcap,
           sinks is None)
    qv, kv, vv, ov = (q, k, v, o) if rows.mode == DENSE else (_as_bhtd(t, rows) for t in (q, k, v, o))
    tensors = (qv, kv, vv, ov, lse, seed if seed is not None else lse,
               _or(rows.seq_q, lse), _or(rows.seq_k, lse), _or(sinks, lse))

    def first():
        meta = _common(qv, kv, scale, dropout_p, fp32_precision, left, rows, right, softcap)
        meta.update(OFFS_64=_offsets_need_64(qv, kv, vv, ov), SPLIT=False, SPLIT_N=0,
                    HAS_SINKS=sinks is not None)
        return ((meta["Tq"], "BLOCK_M", qv.shape[0] * qv.shape[1]),
                (qv.stride(), kv.stride(), vv.stride(), ov.stride(), _stats_strides(lse, rows)), meta)

    _launch_planned("fwd", key, tensors, first)
    return o, lse


def _or(t, other):
    """t, or other where t is None (an unused pointer argument still needs a tensor)."""
    return other if t is None else t


def backward(do, q, k, v, o, lse, seed, scale, dropout_p, fp32_precision, deterministic, dlse=None,
             left=-1, rows=DENSE_ROWS, right=0, softcap=0.0):
    """dq, dk, dv; dlse: the gradient of the forward's (base-2) lse where the caller used it;
    left, right: the window's reach on either side (-1: no bound); rows as the forward's.
    (With sinks the forward's lse holds them: the recomputed weights are right as they are.)"""
    dq, dk, dv = _new_output(q, rows), _new_output(k, rows), _new_output(v, rows)
    qv, kv, vv, dov, ov, dqv, dkv, dvv = ((q, k, v, do, o, dq, dk, dv) if rows.mode == DENSE else
                                          (_as_bhtd(t, rows) for t in (q, k, v, do, o, dq, dk, dv)))
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
           _rows_key(rows), right, softcap)

    def meta(**kernel_flags):
        m = _common(qv, kv, scale, dropout_p, fp32_precision, left, rows, right, softcap)
        m["OFFS_64"] = _offsets_need_64(qv, kv, vv, ov, dov, dqv, dkv, dvv)
        return {**m, **kernel_flags}

    if deterministic and _fused_backward(Tk, head_dim, q.dtype, q.device):  # one launch
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
        first_launch("preprocess", lambda: _bwd_preprocess[(_cdiv(Tq, pre_block), B * H)](
            ov, dov, delta, *seqs, ov.stride(), dov.stride(), stats, H, Tq, Tk, D,
            HEAD_DIM=head_dim, ROWS=rows.mode, OFFS_64=_offsets_need_64(ov, dov),
            DELTA_OFFSET=has_dlse, BLOCK_M=pre_block))
    _launch_planned("dkdv", key + (deterministic,), (qv, kv, vv, dov, dkv, dvv, lse, delta, seed,
                    lse if deterministic else dq_acc, *seqs), lambda: (
        (Tk, "BLOCK_N", B * Hk), (qv.stride(), kv.stride(), vv.stride(), dov.stride(),
                                 dkv.stride(), dvv.stride(), stats), meta(DETERMINISTIC=deterministic)),
        reset=None if deterministic else dq_acc.zero_)
    if not deterministic:
        acc = dq_acc[..., :D]
        torch.mul(acc.transpose(0, 1) if rows.mode == PACKED else acc, scale, out=dq)
    return dq, dk, dv
