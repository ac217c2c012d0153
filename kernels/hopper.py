"""An sm_90 (Hopper) forward kernel, opt-in: issue 17's first step, not yet run on a GPU.

    LECTURE_FLASH_HOPPER=1 python ...     # K/V (and Q) tiles loaded by TMA through descriptors
    LECTURE_FLASH_HOPPER=ws python ...    # the same, and the key loop warp-specialised

What it changes against the portable forward (flash_fwd._attn_fwd), and only that: every tile is
read through a tensor descriptor (one TMA copy a tile, issued by one thread, with the bounds
checked by the copy engine: rows past T read as zeros, so no load needs a mask), and with "ws"
the key loop asks Triton to specialise warps (a producer that issues the copies, consumers that
run the two matmuls and the softmax: the structure FlashAttention-3 writes by hand). The tile
arithmetic is the portable kernel's own jitted helpers (the causal stages, the softmax in base
2, the guard that keeps masked non-finite values out of every output), and the row statistics
go where the portable backward reads them, so the backward is the portable one.

It runs where the portable forward would run dense causal rows without dropout or a window, in
float16 or bfloat16 at head dims 64 and 128, with 16-byte aligned tensors whose head dim is
contiguous (TMA's rules); on an sm_90 GPU, or under Triton's interpreter (the tests). Everything
else takes the portable kernel. Nothing here is the default: a GPU session has to run the GPU
tests and `bench/run.py --only attention` with it first; docs/hopper-notes.md says how, and
holds its notes.
"""
import os

import torch
import triton
import triton.language as tl

from . import flash_launch as launch
from . import flash_tiles as tiles
from .flash_configs import _cfg

MODE = os.environ.get("LECTURE_FLASH_HOPPER", "").strip().lower()  # "", "1" or "ws"
if MODE not in ("", "0", "1", "ws"):
    raise ValueError(f"LECTURE_FLASH_HOPPER must be 1 or ws (or unset), got {MODE!r}")

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4: no host-side descriptors
    TensorDescriptor = None

# The configs tried per head dim, each compiled once per dtype the first time it is tried; the
# first is the choice with autotuning off (the default), and with it on (LECTURE_FLASH_AUTOTUNE=1)
# the fastest is kept per length bucket (kernels/autotune.py, as the portable kernels choose).
# First: FlashAttention-3's causal tile for D = 128 (hopper/tile_size.h: 128 x 128); D = 64
# keeps 128 query rows (FA3 runs 192 with three consumer warp groups, which Triton's automatic
# specialisation does not choose). 128 x 128 x 3 stages at D = 128 is at the 227 KB limit; a
# 64 x 128 tile of 4 warps spilled at D = 128 (compile_report.py --hopper).
CANDIDATES = {
    64: [_cfg(128, 128, 3, 8), _cfg(128, 64, 3, 8), _cfg(128, 128, 4, 8),
         _cfg(128, 64, 3, 4)],
    128: [_cfg(128, 128, 2, 8), _cfg(128, 64, 3, 8), _cfg(128, 128, 3, 8),
          _cfg(128, 64, 2, 8)],
}
# Under the interpreter, small tiles keep the tests fast.
INTERPRETED = _cfg(16, 16, 1, 4)


def applies(q, k, v, dropout_p, left, rows, right=0, softcap=0.0, sinks=None):
    """Whether the Hopper forward runs this call (MODE set, and the call within its reach: the
    plain causal mask, no dropout, softcap or sinks)."""
    if MODE in ("", "0") or TensorDescriptor is None:
        return False
    if (rows.mode != tiles.DENSE or dropout_p > 0.0 or left >= 0 or right != 0 or softcap
            or sinks is not None):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in CANDIDATES:
        return False
    # NVIDIA's sm_90 only: ROCm reports some AMD GPUs (MI200) as capability 9.0 as well.
    if not tiles.INTERPRET and (not q.is_cuda or torch.version.hip is not None
                                or torch.cuda.get_device_capability(q.device) != (9, 0)):
        return False
    # TMA: a contiguous head dim, every other stride and the base 16-byte aligned.
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
    return True


@triton.jit
def _tiles(acc, l_i, m_i, q, k_desc, v_desc, b, hk, offs_m, lo, hi, head,
           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
           STAGES: tl.constexpr, WS: tl.constexpr):
    """flash_fwd._fwd_tiles for dense rows without dropout, its K/V tiles read through descriptors
    (zeros past Tk, which only masked tiles reach and the causal mask hides)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES, warp_specialize=WS):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k_tile = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tiles._dot(q, k_tile.T, None, "ieee")  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            s = tl.where(tiles._visible(offs_m, offs_n, head), s, float("-inf"))
        m_new = tl.maximum(m_i, tiles._row_max(s, head))
        p = tiles._exp2_weights(tl.fma(s, head.qk_scale, -m_new[:, None]), head)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_tile = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if MASKED:  # the portable kernel's guard: a masked NaN/inf value reaches no output
            finite = tiles._finite(v_tile)
            key_ok = tl.min(finite.to(tl.int32), 1)
            bad_keys = tl.where(key_ok == 0, offs_n, head.Tk)
            row_bad = tl.min(bad_keys, 0) <= offs_m + head.offset
            v_tile = tl.where(finite, v_tile, 0.0)
        acc = tiles._dot(tiles._to(p, v_tile.dtype), v_tile, acc * alpha[:, None], "ieee")
        if MASKED:
            l_i = tl.where(row_bad, float("nan"), l_i)
        m_i = m_new
    return acc, l_i, m_i


# Lengths and head counts vary call to call: unspecialised, as flash's kernels (_NO_SPECIALIZE).
@triton.jit(do_not_specialize=["H", "Tq", "Tk"])
def _attn_fwd_hopper(q_desc, k_desc, v_desc, O, LSE, stride_o, stride_stats, H, GROUP, Tq, Tk,
                     scale, HEAD_DIM: tl.constexpr, HUGE_SCALE: tl.constexpr,
                     OFFS_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     STAGES: tl.constexpr, WS: tl.constexpr):
    # Longest row blocks first, as the portable forward launches them.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    b, h, bh = tiles._batch_and_head(H)
    head = tiles._head(b, h, H, LSE, LSE, stride_stats, Tq, Tk, scale, LSE, 0.0, 0,
                       DROPOUT=False, HUGE_SCALE=HUGE_SCALE, WINDOW=False, ROWS=0)
    b32, h32 = b.to(tl.int32), h.to(tl.int32)  # descriptor coordinates are 32-bit
    hk = h32 // GROUP
    offs_m = tiles._offsets(start_m, BLOCK_M, OFFS_64)
    offs_d = tiles._offsets(0, HEAD_DIM, OFFS_64)
    q = q_desc.load([b32, h32, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    _, lo_full, full_end, diag_end = tiles._key_stages(start_m, head, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_desc, v_desc, b32, hk, offs_m, lo_full, full_end,
                           head, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, MASKED=False, STAGES=STAGES,
                           WS=WS)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q, k_desc, v_desc, b32, hk, offs_m, full_end, diag_end,
                           head, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, MASKED=True, STAGES=STAGES,
                           WS=WS)
    tl.store(tiles._row_stats(LSE, head) + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < head.Tq)
    o = tiles._slab(O, stride_o, b, h, 0, head.Tq)
    tiles._store_tile(o, offs_m, offs_d, HEAD_DIM, acc / l_i[:, None])


def candidates(D, mode=None):
    """The configs forward() chooses among for head dim D. In "ws" mode the 8-warp ones only:
    Triton 3.9 specialises the warps of a 4-warp config for sm_90, and its pass fails an
    assertion on this kernel (compile_report.py --hopper shows it); 8-warp configs compile as in
    mode 1 there. (The GPU image's Triton 3.6 is to be seen.)"""
    if tiles.INTERPRET:
        return [INTERPRETED]
    mode = MODE if mode is None else mode
    return [c for c in CANDIDATES[D] if mode != "ws" or c.num_warps == 8]


def forward(q, k, v, scale):
    """(o, lse) as flash_launch.forward returns them (o stored (B, T, H, D), lse (B, H, Tq) base 2),
    for a call applies() accepted; scale > 0."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = launch._new_output(q, launch.DENSE_ROWS)
    lse = launch._new_stats(q, launch.DENSE_ROWS)
    offs_64 = launch._offsets_need_64(q, k, v, o)

    def run(conf):
        block_m, block_n = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
        q_desc = TensorDescriptor.from_tensor(q, [1, 1, block_m, D])
        k_desc, v_desc = (TensorDescriptor.from_tensor(t, [1, 1, block_n, D]) for t in (k, v))
        grid = (triton.cdiv(Tq, block_m), B * H)
        _attn_fwd_hopper[grid](q_desc, k_desc, v_desc, o, lse, o.stride(), lse.stride()[:2], H,
                               H // k.shape[1], Tq, Tk, scale, HEAD_DIM=D,
                               HUGE_SCALE=abs(scale) > 1.0, OFFS_64=offs_64, BLOCK_M=block_m,
                               BLOCK_N=block_n, STAGES=conf.num_stages, WS=MODE == "ws",
                               num_warps=conf.num_warps, num_stages=conf.num_stages)

    # The portable kernels' key layout (kernel, dtype, device, launch._TUNE_KEY), so that
    # flash.autotune_report() lists these choices beside theirs.
    key = (f"fwd_hopper{'_ws' if MODE == 'ws' else ''}", q.dtype, q.device, launch._bucket(Tq),
           launch._bucket(Tk), D, False, "ieee", None, False)
    launch.first_launch("fwd_hopper", lambda: launch._TUNER.run(key, lambda: candidates(D), run))
    return o, lse
