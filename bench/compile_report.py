"""What the compiler makes of the Triton kernels for a GPU, on any machine, GPU or not.

    python bench/compile_report.py                        # H100 (sm_90), bf16, D 64 and 128
    python bench/compile_report.py --arch 80 --dtype float16 --head-dim 64 --dropout
    python bench/compile_report.py --fixed                # only the configs used untuned

Triton compiles ahead of time for a named target without a device (its bundled ptxas makes the
cubin). For each kernel (fwd, dkdv, dq) and autotune config this prints registers per thread,
stack bytes (spilled registers live there), shared memory against the target's per-block limit,
whether the K/V loads are software-pipelined (async copies), the SASS instruction count, and
which tensor-core instructions the dots became (on sm_90, a dot left on mma.sync forgoes wgmma).

These are static facts, not timings: a config that spills or does not pipeline is slow, but
which of the clean ones is fastest only a GPU can say (bench/run.py). A config that needs more
shared memory than the target has is skipped, as the autotuner and the untuned launcher skip
it. The exit status is 1 if any variant fails to compile or no config of a kernel fits, so CI
can hold every kernel to "it builds for a GPU" without one.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py compiles real GPU code: run it without TRITON_INTERPRET=1")

# Python puts bench/ on sys.path, never the repository root (whose kernels/ would shadow Hugging
# Face's `kernels`): lecture_flash comes from its install (pip install -e .).
import harness  # noqa: E402,F401  (first: it says how to install lecture_flash if it is missing)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lecture_flash import flash_launch, flash_tiles, settings  # noqa: E402

# Shared memory one block may use, in bytes (CUDA programming guide, compute capabilities).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # in the input dtype
FLOAT32 = {"LSE", "DELTA", "DQ_ACC"}
ROWS = {"dense": flash_tiles.DENSE, "lengths": flash_tiles.KEY_LENGTHS,
        "cache": flash_tiles.CACHE_LENGTHS, "packed": flash_tiles.PACKED}
# Plain integer arguments that launches leave unspecialised (see flash_tiles._NO_SPECIALIZE).
UNSPECIALISED = set(flash_tiles._NO_SPECIALIZE)


def signature(fn, dtype, constexprs):
    """Argument types and attributes as a real launch of flash's wrappers presents them: 16-byte
    aligned pointers; each tensor's four strides (a tuple, stride_<tensor>) divisible by 16 but
    the last, the head-dim stride, which equals 1 (contiguous rows) and so is a constant."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name == "stride_stats":  # (batch, head) strides of the row statistics: any values
            sig[name] = ("i32", "i32")
            continue
        if name.startswith("stride_"):
            sig[name] = ("i32", "i32", "i32", "constexpr")
            constexprs[(i, 3)] = 1
            for j in range(3):
                attrs[(i, j)] = [["tt.divisibility", 16]]
            continue
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in TENSORS:
            sig[name] = "*" + dtype
        elif name in FLOAT32:
            sig[name] = "*fp32"
        elif name == "SEED":
            sig[name] = "*i64"
        elif name in ("SEQ_Q", "SEQ_K"):  # per-row lengths or cumulative lengths
            sig[name] = "*i32"
        elif name in ("scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if fn.params[i].is_constexpr:
            raise TypeError(f"{fn.__name__}: constexpr argument {name} has no value here")
        if sig[name].startswith("*") or (sig[name] == "i32" and name not in UNSPECIALISED):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(kind, dtype, head_dim, config, dropout, arch, deterministic=True,
                   fp32_precision="ieee", huge_scale=False, window=False, rows=flash_tiles.DENSE):
    fn = flash_launch._JIT[kind]
    hd = flash_launch._head_dim(head_dim)
    # GROUP = 1 (one query head per key/value head) is a constant in real launches: Triton
    # specialises an integer argument equal to 1, so the grouped loops fold away.
    constexprs = dict(GROUP=1, WINDOW=window, D=head_dim, HEAD_DIM=hd, DROPOUT=dropout, HUGE_SCALE=huge_scale,
                      FP32_PRECISION=fp32_precision if dtype == "fp32" else "ieee",
                      OFFS_64=False, ROWS=rows,
                      **config.kwargs)
    if "SPLIT" in fn.arg_names:  # flash-decoding's split keys: the decode step only
        constexprs["SPLIT"] = False
    if "DETERMINISTIC" in fn.arg_names:
        constexprs["DETERMINISTIC"] = deterministic
    if "DELTA_OFFSET" in fn.arg_names:  # the lse's own gradient: only where a caller uses lse
        constexprs["DELTA_OFFSET"] = False
    sig, attrs = signature(fn, dtype, constexprs)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def compile_hopper(dtype, head_dim, ws, config):
    """kernels/hopper.py's forward for sm_90 with this config; ws: the key loop
    warp-specialised (LECTURE_FLASH_HOPPER=ws)."""
    from lecture_flash import hopper
    fn = hopper._attn_fwd_hopper
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    warps, stages = config.num_warps, config.num_stages
    constexprs = dict(HEAD_DIM=head_dim, HUGE_SCALE=False, OFFS_64=False, BLOCK_M=block_m,
                      BLOCK_N=block_n, STAGES=stages, WS=ws, GROUP=1)
    sig, attrs = signature(fn, dtype, constexprs)  # as a launch presents them; then the
    for name in ("q_desc", "k_desc", "v_desc"):    # descriptors, typed by their block shapes
        rows = block_m if name == "q_desc" else block_n
        sig[name] = f"tensordesc<{dtype}[1, 1, {rows}, {head_dim}]>"
        attrs.pop((fn.arg_names.index(name),), None)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def hopper_report(dtypes, head_dims, fixed):
    """One line per (dtype, head dim, config, mode) of the Hopper forward (fixed: the first
    config only, its choice with autotuning off); the number of failures."""
    from lecture_flash import hopper
    print(f"{'kernel':10s} {'dtype':5s} {'D':>3s} {'BMxBN':>7s} {'warps':>5s} {'stages':>6s} "
          f"{'regs':>4s} {'stack':>5s} {'shared':>7s} {'TMA':>4s} {'WS':>3s} {'SASS':>6s} {'mma':>8s}")
    failures = 0
    for dtype in dtypes:
        for D in [d for d in head_dims if d in hopper.CANDIDATES]:
          for c in hopper.CANDIDATES[D][:1] if fixed else hopper.CANDIDATES[D]:  # noqa: E111
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            for ws in (False, True):
                if ws and c not in hopper.candidates(D, "ws"):
                    continue  # a config "ws" mode does not try (hopper.candidates says why)
                head = (f"{'hopper-ws' if ws else 'hopper':10s} {dtype:5s} {D:3d} {f'{bm}x{bn}':>7s} "
                        f"{c.num_warps:5d} {c.num_stages:6d}")
                try:
                    kernel = compile_hopper(dtype, D, ws, c)
                except Exception as e:
                    failures += 1
                    print(f"{head}  FAILED to compile: {type(e).__name__}: {str(e).strip()[:200]}")
                    continue
                f = inspect(kernel)
                if f["shared"] > SMEM_LIMIT[90]:
                    print(f"{head}  too much shared memory for sm_90 ({f['shared']} bytes): skipped")
                    continue
                sass = _cuobjdump(kernel, "-sass") or ""
                tma = "yes" if "UTMALDG" in sass else "no" if sass else "?"
                # The loop attribute (tt.warp_specialize) asks; partitions (a ttg.warp_specialize
                # op) are what the compiler made of it.
                specialised = "yes" if "ttg.warp_specialize" in kernel.asm.get("ttgir", "") else "no"
                show = lambda v: "?" if v is None else v  # noqa: E731
                print(f"{head} {show(f['regs']):>4} {show(f['stack']):>5} {f['shared']:7d} {tma:>4s} "
                      f"{specialised:>3s} {show(f['sass']):>6} {show(f['mma']):>8}"
                      f"{'  spills' if f['stack'] else ''}")
    return failures


def _cuobjdump(kernel, *args):
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() or "cubin" not in kernel.asm:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        r = subprocess.run([str(tool), *args, str(path)], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def inspect(kernel):
    """registers, stack bytes, shared bytes, pipelined, SASS instruction count, and which
    tensor-core instructions the dots became: Hopper's wgmma (HGMMA), the older warp-level
    mma.sync (HMMA), both, or none (None: unknown)."""
    facts = dict(regs=None, stack=None, shared=kernel.metadata.shared, sass=None, mma=None)
    ttgir = kernel.asm.get("ttgir", "")
    facts["pipelined"] = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
    usage = _cuobjdump(kernel, "-res-usage") or ""
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m:
        facts["regs"], facts["stack"] = int(m.group(1)), int(m.group(2))
    sass = _cuobjdump(kernel, "-sass")
    if sass is not None:
        ops = collections.Counter(m.group(1) for m in re.finditer(
            r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
        facts["sass"] = sum(ops.values())
        kinds = [name for op, name in (("HGMMA", "wgmma"), ("HMMA", "mma.sync")) if ops[op]]
        facts["mma"] = "+".join(kinds) or "none"
    return facts


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT),
                   help="compute capability x10: 90 H100/H200, 80 A100, 86/89 RTX 30/40 (default 90)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default bfloat16)")
    p.add_argument("--head-dim", default="64,128", help="comma-separated, 1..256 (default 64,128)")
    p.add_argument("--kernel", action="append", choices=sorted(flash_launch._CONFIGS), help="repeatable (default all)")
    p.add_argument("--dropout", action="store_true", help="the kernels with dropout compiled in")
    p.add_argument("--nondeterministic", action="store_true",
                   help="the dK/dV kernel of the deterministic=False backward (adds dQ atomically)")
    p.add_argument("--window", action="store_true",
                   help="the kernels a sliding window (causal_attention(window=...)) gets")
    p.add_argument("--rows", choices=["dense", "lengths", "cache", "packed"], default="dense",
                   help="how rows are found: dense (default), per-row key lengths (seqlens_k), "
                        "a decode cache's lengths, or packed sequences (cu_seqlens)")
    p.add_argument("--huge-scale", action="store_true",
                   help="the kernels |scale| > 1 gets (softmax guarded for huge scaled scores)")
    p.add_argument("--fp32-precision", choices=settings.FP32_PRECISIONS,
                   default=settings.resolve_fp32_precision(),
                   help="float32 dots (default: what a call gets now, %(default)s)")
    p.add_argument("--fixed", action="store_true",
                   help="stop at the config each kernel uses with autotuning off (the first that fits)")
    p.add_argument("--hopper", action="store_true",
                   help="instead, the opt-in sm_90 forward (kernels/hopper.py), with and without "
                        "warp specialisation: TMA loads, registers, spills")
    args = p.parse_args(argv)
    try:
        args.head_dims = [int(d) for d in args.head_dim.split(",")]
    except ValueError:
        p.error(f"--head-dim must be comma-separated integers, got {args.head_dim!r}")
    if not all(1 <= d <= 256 for d in args.head_dims):
        p.error(f"--head-dim values must be in 1..256, got {args.head_dim!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.hopper:
        print(f"triton {triton.__version__}, target sm_90, the Hopper forward (kernels/hopper.py)")
        failures = hopper_report([DTYPES[d] for d in (args.dtype or ["bfloat16"])], args.head_dims,
                                 args.fixed)
        return 1 if failures else 0
    limit = SMEM_LIMIT[args.arch]
    print(f"triton {triton.__version__}, target sm_{args.arch}, shared memory limit {limit} bytes per block")
    print(f"{'kernel':6s} {'dtype':5s} {'D':>3s} {'BMxBN':>7s} {'warps':>5s} {'stages':>6s} "
          f"{'regs':>4s} {'stack':>5s} {'shared':>7s} {'pipelined':>9s} {'SASS':>6s} {'mma':>14s}  note")
    failures = 0
    show = lambda v: "?" if v is None else v  # noqa: E731
    for dtype in [DTYPES[d] for d in (args.dtype or ["bfloat16"])]:
        for kind in args.kernel or list(flash_launch._CONFIGS):
            for D in args.head_dims:
                if kind == "fused" and not flash_launch._fused_backward(0, flash_launch._head_dim(D), TORCH_DTYPES[dtype]):
                    print(f"{kind:6s} {dtype:5s} {D:3d}  not used for this head dim and dtype "
                          "(two launches instead)")
                    continue
                # The configs flash tries for a long sequence of this head dim and dtype, in order.
                q = torch.empty(0, dtype=TORCH_DTYPES[dtype])
                configs = flash_launch._prune(flash_launch._CONFIGS[kind], dict(
                    Q=q, TQ_BUCKET=1 << 16, TK_BUCKET=1 << 16, HEAD_DIM=flash_launch._head_dim(D)))
                loads = False
                for c in configs:
                    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                    head = (f"{kind:6s} {dtype:5s} {D:3d} {f'{bm}x{bn}':>7s} {c.num_warps:5d} "
                            f"{c.num_stages:6d}")
                    try:
                        f = inspect(compile_kernel(kind, dtype, D, c, args.dropout, args.arch,
                                                   not args.nondeterministic, args.fp32_precision,
                                                   args.huge_scale, args.window,
                                                   ROWS[args.rows]))
                    except Exception as e:  # report every variant, then fail at the end
                        failures += 1
                        print(f"{head}  FAILED to compile: {type(e).__name__}: {str(e).strip()[:200]}")
                        continue
                    notes = []
                    if f["shared"] > limit:  # the autotuner and the untuned launcher move on
                        notes.append("too much shared memory for this target: skipped")
                    elif not loads:
                        loads = True
                        notes.append("the untuned choice")
                    if f["stack"]:
                        notes.append("spills")
                    print(f"{head} {show(f['regs']):>4} {show(f['stack']):>5} {f['shared']:7d} "
                          f"{'yes' if f['pipelined'] else 'no':>9s} {show(f['sass']):>6} {show(f['mma']):>14}  {', '.join(notes)}")
                    if args.fixed and loads:
                        break
                if not loads:
                    failures += 1
                    print(f"{kind:6s} {dtype:5s} {D:3d}  no config fits this target")
    if failures:
        print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
