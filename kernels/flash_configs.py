"""The configs each kernel may take, and which of them the GPU in hand can hold.

A config is a tile shape, warps and pipeline stages. Every config compiles once per (dtype,
head dim) at its first launch, which costs seconds, so the choice is made before anything
compiles: a GPU whose configs a committed report measured (TUNED, flash_tuned.py) gets those;
any other gets the first candidate, in CONFIGS' order, that fits the problem and, by the
estimate below, the device's shared memory (devices.py). A config that still fails to load is
skipped for the next (autotune.first_that_loads), and a kernel none of whose configs fits is
never launched: the call goes to PyTorch (flash.supports).

What Triton allocates in shared memory depends on the architecture and its own version
(pipeline buffers, operand tiles of wgmma, layout conversions through shared memory), so the
estimate is an upper bound: the tiles each pipeline stage streams, the tiles a program holds
and, where the architecture stages it, the score tile, times a margin per architecture family
and element size fitted over compiles for every portability target (bench/compile_report.py
--portability checks it on the configs the runtime chooses).
"""
import functools

import triton

from .devices import Target


def _cfg(bm, bn, stages, warps, narrow_rows_only=False, wide_rows_need_wgmma=False):
    """A config; narrow_rows_only: for rows of at most 128 bytes (D 64 in 16-bit) anywhere;
    wide_rows_need_wgmma: wider rows only where the dots are wgmma or tcgen05 (sm_90, sm_100),
    which keep their accumulators out of the registers mma.sync spills."""
    conf = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
    conf.narrow_rows_only, conf.wide_rows_need_wgmma = narrow_rows_only, wide_rows_need_wgmma
    return conf


# Few configs on purpose: each costs a compile per (dtype, head dim). The first that fits is
# the choice when autotuning is off; the later ones are smaller, for smaller problems and
# smaller GPUs. Registers and spills of each, for any GPU target, from a CPU:
# python bench/compile_report.py
CONFIGS = {
    # Forward: wide query tiles amortise the Q load.
    "fwd": [_cfg(128, 64, 3, 8), _cfg(128, 128, 3, 8), _cfg(128, 64, 3, 4), _cfg(64, 64, 3, 4),
            _cfg(64, 32, 2, 4)],
    # dK/dV holds two (BLOCK_N, D) accumulators and streams narrow query tiles.
    "dkdv": [_cfg(64, 128, 2, 8, narrow_rows_only=True),
             _cfg(32, 128, 2, 8, wide_rows_need_wgmma=True), _cfg(32, 64, 3, 4),
             _cfg(32, 32, 1, 4)],
    # dQ holds one (BLOCK_M, D) accumulator and streams narrow key tiles. The wide ones at D 128
    # on mma.sync GPUs: 32 registers and 4.6 KB of stack, 696 bytes (sm_80, compile_report).
    "dq": [_cfg(128, 64, 2, 8, wide_rows_need_wgmma=True),
           _cfg(128, 32, 3, 4, wide_rows_need_wgmma=True), _cfg(64, 32, 3, 4), _cfg(32, 32, 1, 4)],
    # The short-sequence backward runs both passes with one pair of tiles.
    "fused": [_cfg(64, 64, 2, 8), _cfg(64, 64, 2, 4), _cfg(64, 128, 2, 8), _cfg(32, 32, 1, 4)],
}
# The kernels a training step needs, whichever backward runs: a device that can hold none of
# one's configs cannot run the call.
NEEDED = ("fwd", "dq", "dkdv")


def _streamed_and_held(kernel, bm, bn, head_dim, element_size):
    """(bytes one pipeline stage streams, bytes held for the whole loop) of a kernel's tiles."""
    row_m, row_n = bm * head_dim * element_size, bn * head_dim * element_size
    if kernel == "fwd":        # K and V stream past a Q tile
        return 2 * row_n, row_m
    if kernel == "dq":         # K and V stream past Q and dO
        return 2 * row_n, 2 * row_m
    if kernel == "dkdv":       # Q and dO stream past K and V
        return 2 * row_m, 2 * row_n
    # fused: both passes, each streaming its side past the other's
    return 2 * max(row_m, row_n), 2 * max(row_m, row_n)


# Per architecture family and element size: whether the score tile counts, and the margin. The
# smallest bound covering every compile measured (269 drawn at random from every kernel and
# config, fp16 and fp32, head dims 32 to 256 and the nine portability targets, Triton 3.9),
# with a little room: the largest ratio seen, over the same tiles, is in the comment.
# bench/compile_report.py --portability checks the configs the runtime chooses.
_FIT = {
    ("sm_75", 2): (True, 1.5),     # 1.455
    ("sm_75", 4): (True, 1.05),    # 1.000
    ("mma.sync", 2): (False, 1.02),  # 1.000 (sm_80-sm_89, sm_120)
    ("mma.sync", 4): (True, 1.02),   # 1.000
    ("wgmma", 2): (True, 1.3),     # 1.240 (sm_90, sm_100)
    ("wgmma", 4): (True, 1.05),    # 1.000
    ("amd", 2): (False, 1.05),     # 1.010
    ("amd", 4): (True, 1.0),       # 0.727
}


def _family(target):
    """The kind of matrix instructions `target`'s dots become (None: an unknown architecture)."""
    if target.backend == "hip":
        return "amd"
    if target.arch < 80:
        return "sm_75"
    if target.arch in (90, 100, 103):
        return "wgmma"
    return "mma.sync" if target.arch in (80, 86, 87, 89, 120) else None


def shared_estimate(kernel, conf, head_dim, element_size, target):
    """An upper bound of the shared memory, in bytes, that `kernel` with `conf` takes at this
    (padded) head dim and element size on `target`: see the module docstring. An architecture
    of no known family takes the widest bound."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    streamed, held = _streamed_and_held(kernel, bm, bn, head_dim, element_size)
    scores = bm * bn * element_size  # P or dS staged for a layout conversion
    family = _family(target)
    with_scores, margin = (_FIT[(family, 2 if element_size == 2 else 4)] if family
                           else (True, max(m for _, m in _FIT.values())))
    return int(margin * (conf.num_stages * streamed + held + (scores if with_scores else 0)))


def fits_device(kernel, conf, head_dim, element_size, target):
    """Whether `conf` of `kernel` suits the target: within its shared memory by the estimate,
    and for wide rows on GPUs whose dots are mma.sync, not a config that spills there (always,
    without a target: the interpreter). Tiles of head dim 256 must be small as well."""
    if head_dim >= 256 and conf.kwargs["BLOCK_M"] * conf.kwargs["BLOCK_N"] > 64 * 32:
        return False
    if target is None:
        return True
    if (getattr(conf, "wide_rows_need_wgmma", False) and head_dim * element_size > 128
            and _family(target) != "wgmma"):
        return False
    return shared_estimate(kernel, conf, head_dim, element_size, target) <= target.shared_memory


def fits_problem(conf, head_dim, element_size, tq_bucket, tk_bucket):
    """Whether `conf` suits the problem: tiles no larger than it (its length buckets), and the
    register-hungry configs only for 2-byte rows of at most 64 (wider, they spill)."""
    if conf.kwargs["BLOCK_M"] > max(32, tq_bucket) or conf.kwargs["BLOCK_N"] > max(32, tk_bucket):
        return False
    return not (getattr(conf, "narrow_rows_only", False) and head_dim * element_size > 128)


def candidates(kernel, dtype, head_dim, element_size, tq_bucket, tk_bucket, target=None):
    """The configs to try for one specialisation, in order: a tuned one for this target where a
    report measured it (flash_tuned.py), then CONFIGS' that fit the device and the problem,
    else the smallest that fits the device (a decode step's single query row). Empty: none
    fits the device."""
    device = [c for c in CONFIGS[kernel] if fits_device(kernel, c, head_dim, element_size, target)]
    found = [c for c in device if fits_problem(c, head_dim, element_size, tq_bucket, tk_bucket)]
    found = found or device[-1:]
    tuned = tuned_config(kernel, dtype, head_dim, tq_bucket, tk_bucket, target)
    if tuned is not None:
        found = [tuned] + [c for c in found if _shape(c) != _shape(tuned)]
    return found


@functools.lru_cache(maxsize=256)  # asked per call by the packed and decode paths
def unsupported(target: Target, dtype_name, head_dim, element_size):
    """Why no config of some kernel fits `target` at this dtype and (padded) head dim, or None."""
    for kernel in NEEDED:
        if not any(fits_device(kernel, c, head_dim, element_size, target) for c in CONFIGS[kernel]):
            smallest = min(shared_estimate(kernel, c, head_dim, element_size, target)
                           for c in CONFIGS[kernel])
            return (f"on {target.describe()}, {dtype_name} at head dim {head_dim} needs about "
                    f"{smallest:,} bytes of shared memory for the {kernel} kernel's smallest "
                    f"tiles, over the {target.shared_memory:,} a block may use")
    return None


def declined(target):
    """Why backend="auto" leaves the Triton kernels out on `target` though they run there, or
    None. Triton 3.9 (the version checked) gives sm_75 (Turing: T4, RTX 20xx) no tensor-core
    instructions, in any dtype: its dots become FMA loops that spill (compile_report shows 255
    registers and hundreds of bytes of stack), where PyTorch's SDPA kernels use the tensor
    cores. backend="triton" still runs them there."""
    if target is not None and target.backend == "cuda" and target.arch < 80:
        return (f"Triton compiles no tensor-core instructions for {target.describe()}: "
                "backend='auto' takes PyTorch's SDPA there")
    return None


def _shape(conf):
    return (conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages)


def tuned_config(kernel, dtype, head_dim, tq_bucket, tk_bucket, target):
    """The config a committed GPU report chose for this specialisation on this target, or
    None (flash_tuned.TUNED)."""
    if target is None:
        return None
    from .flash_tuned import TUNED
    shape = TUNED.get((target.label, kernel, str(dtype).replace("torch.", ""), head_dim,
                       tq_bucket, tk_bucket))
    return None if shape is None else _cfg(*shape[:2], shape[3], shape[2])
