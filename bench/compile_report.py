"""What the compiler makes of the Triton kernels for a GPU, on any machine, GPU or not.

    python bench/compile_report.py                        # H100 (sm_90), bf16, D 64 and 128
    python bench/compile_report.py --arch 75 --dtype float16 --head-dim 64 --dropout
    python bench/compile_report.py --arch gfx942 --fixed  # an MI300, the configs used untuned
    python bench/compile_report.py --portability          # every GPU our users have: a verdict each
    python bench/compile_report.py --hopper               # the opt-in sm_90 forward

Triton compiles ahead of time for a named target without a device (NVIDIA: its bundled ptxas
makes the cubin; AMD: its linker runs in-process). For each kernel and config this prints
registers per thread, spilled bytes (stack/scratch), shared memory against the target's
per-block limit (kernels/devices.py), whether the K/V loads are software-pipelined, the
instruction count, and which matrix instructions the dots became: NVIDIA's mma.sync (sm_80-89,
sm_120), Hopper's wgmma, Blackwell's tcgen05 (sm_100), AMD's mfma. Kernels: the forward, the
backward's dK/dV, dQ, the one-launch short-sequence backward and the atomic path's delta
preprocess, and flash-decoding's split forward and its merge.

--portability compiles, for every target of devices.PORTABILITY, the configs the runtime would
choose there (kernels/flash_configs.py: first fit by the shared-memory estimate) for the lecture's
training step (T = 256: the forward and the backward it takes) and a decode step, in fp16, bf16
and fp32 at D 64 and 128 (--head-dim for more), and prints one verdict line per target: runs;
runs after failed configs (a chosen config does not compile, or needs more shared memory than
the target has, and the runtime tries the next until one works, as it does on the device); falls
back to SDPA (where the runtime sends the call to PyTorch, and why); or would fail (no config
of a kernel works: the first call fails its compiles and the guard sends it to PyTorch). It
exits 1 on the last two kinds but "falls back" (a config table, or the installed Triton, to fix
for that target). The compile seconds are those the first training step of a process pays
there (CPU time of the ahead-of-time compiles, failed ones included).

These are static facts, not timings: a config that spills or does not pipeline is slow, but
which of the clean ones is fastest only a GPU can say (bench/run.py).
"""
import argparse
import collections
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py compiles real GPU code: run it without TRITON_INTERPRET=1")
# Triton 3.9 warns at every compile that this default will change; the runtime compiles with it
# on as well (the kernels' softmax is written with explicit fused multiply-adds regardless).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Python puts bench/ on sys.path, never the repository root (whose kernels/ would shadow Hugging
# Face's `kernels`): lecture_flash comes from its install (pip install -e .).
import harness  # noqa: E402,F401  (first: it says how to install lecture_flash if it is missing)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lecture_flash import devices, flash_configs, flash_decode, flash_launch, flash_tiles, settings  # noqa: E402

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # in the input dtype
FLOAT32 = {"LSE", "DELTA", "DQ_ACC", "O_PART", "LSE_PART", "SINKS"}
ROWS = {"dense": flash_tiles.DENSE, "lengths": flash_tiles.KEY_LENGTHS,
        "cache": flash_tiles.CACHE_LENGTHS, "packed": flash_tiles.PACKED}
# Plain integer arguments that launches leave unspecialised (see flash_tiles._NO_SPECIALIZE).
UNSPECIALISED = set(flash_tiles._NO_SPECIALIZE)
# Kernels beyond the autotuned four: flash-decoding's split forward (the forward kernel with
# SPLIT and a decode cache's rows, on the forward's configs), its merge, and the preprocess of
# the atomic-dQ backward; the last two launch with fixed tiles.
KERNELS = (*flash_configs.CONFIGS, "decode", "combine", "preprocess")
FIXED_TILES = {"combine": flash_configs._cfg(1, 1, 1, 4), "preprocess": flash_configs._cfg(64, 1, 3, 4)}
DECODE_SPLITS = 16  # the split count a batch-1 decode step compiles (SPLITS, a power of two)


def parse_arch(text):
    """75 (sm_75) or "gfx942"."""
    text = str(text)
    arch = text if text.startswith("gfx") else int(text.removeprefix("sm_"))
    devices.target(arch)  # raises for an unknown arch, naming the known ones
    return arch


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
        elif name in ("scale", "dropout_p", "CAP"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if fn.params[i].is_constexpr:
            raise TypeError(f"{fn.__name__}: constexpr argument {name} has no value here")
        if sig[name].startswith("*") or (sig[name] == "i32" and name not in UNSPECIALISED):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def gpu_target(target):
    return GPUTarget(target.backend, target.arch, target.warp_size)


def compile_kernel(kind, dtype, head_dim, config, target, dropout=False, deterministic=True,
                   fp32_precision="ieee", huge_scale=False, window=False, rows=flash_tiles.DENSE,
                   right=False, softcap=False, sinks=False):
    """One kernel (KERNELS) compiled for `target` with `config`, as the runtime launches it;
    right, softcap, sinks: the specialisations a window's right side (or full attention),
    softcapping and attention sinks get."""
    hd = flash_launch._head_dim(head_dim)
    if kind == "combine":
        fn = flash_decode._combine_splits
        constexprs = dict(D=head_dim, HEAD_DIM=triton.next_power_of_2(head_dim), SPLITS=DECODE_SPLITS)
    elif kind == "preprocess":
        fn = flash_launch._bwd_preprocess
        constexprs = dict(D=head_dim, HEAD_DIM=hd, ROWS=rows, OFFS_64=False, DELTA_OFFSET=False,
                          BLOCK_M=config.kwargs["BLOCK_M"])
    else:
        fn = flash_launch._JIT["fwd" if kind == "decode" else kind]
        # GROUP = 1 (one query head per key/value head) is a constant in real launches: Triton
        # specialises an integer argument equal to 1, so the grouped loops fold away.
        constexprs = dict(GROUP=1, WINDOW=window, D=head_dim, HEAD_DIM=hd, DROPOUT=dropout,
                          HUGE_SCALE=huge_scale, OFFS_64=False,
                          FP32_PRECISION=fp32_precision if dtype == "fp32" else "ieee",
                          ROWS=flash_tiles.CACHE_LENGTHS if kind == "decode" else rows,
                          **config.kwargs)
        if "SPLIT" in fn.arg_names:  # flash-decoding's split keys: the decode step only
            constexprs["SPLIT"] = kind == "decode"
        if "DETERMINISTIC" in fn.arg_names:
            constexprs["DETERMINISTIC"] = deterministic
        if "DELTA_OFFSET" in fn.arg_names:  # the lse's own gradient: only where a caller uses lse
            constexprs["DELTA_OFFSET"] = False
        # By default the causal mask, no softcap, no sinks: what every causal call takes.
        constexprs.update(RIGHT=right, SOFTCAP=softcap)
        if "HAS_SINKS" in fn.arg_names:
            constexprs["HAS_SINKS"] = sinks
    sig, attrs = signature(fn, dtype, constexprs)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=gpu_target(target),
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
    limit = devices.target(90).shared_memory
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
                f = inspect(kernel, devices.target(90))
                if f["shared"] > limit:
                    print(f"{head}  too much shared memory for sm_90 ({f['shared']} bytes): skipped")
                    continue
                sass = _cuobjdump(kernel, "-sass") or ""
                tma = "yes" if "UTMALDG" in sass else "no" if sass else "?"
                # The loop attribute (tt.warp_specialize) asks; partitions (a ttg.warp_specialize
                # op) are what the compiler made of it.
                specialised = "yes" if "ttg.warp_specialize" in kernel.asm.get("ttgir", "") else "no"
                show = lambda v: "?" if v is None else v  # noqa: E731
                print(f"{head} {show(f['regs']):>4} {show(f['stack']):>5} {f['shared']:7d} {tma:>4s} "
                      f"{specialised:>3s} {show(f['instructions']):>6} {show(f['mma']):>8}"
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


def inspect(kernel, target):
    """registers, spilled bytes (stack, or AMD's scratch), shared bytes, pipelined, instruction
    count, and which matrix instructions the dots became (None: unknown)."""
    facts = dict(regs=None, stack=None, shared=kernel.metadata.shared, instructions=None, mma=None)
    ttgir = kernel.asm.get("ttgir", "")
    facts["pipelined"] = any(op in ttgir for op in ("async_copy_global_to_local", "async_tma_copy",
                                                    "buffer_load_to_local"))
    if target.backend == "hip":
        amd = kernel.asm.get("amdgcn", "")
        field = lambda name: int(m.group(1)) if (m := re.search(r"\." + name + r":\s+(\d+)", amd)) else None  # noqa: E731
        facts["regs"], facts["stack"] = field("vgpr_count"), field("private_segment_fixed_size")
        facts["pipelined"] = facts["pipelined"] or (ttgir.count("ttg.local_alloc") > 0
                                                    and kernel.metadata.num_stages > 1)
        ops = re.findall(r"^\s+([a-z][a-z0-9_]*)\s", amd, re.M)
        facts["instructions"] = sum(1 for op in ops if op.split("_")[0] in
                                    ("v", "s", "ds", "global", "buffer", "flat", "scratch"))
        facts["mma"] = "mfma" if any(op.startswith("v_mfma") for op in ops) else "none"
        return facts
    usage = _cuobjdump(kernel, "-res-usage") or ""
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m:
        facts["regs"], facts["stack"] = int(m.group(1)), int(m.group(2))
    sass = _cuobjdump(kernel, "-sass")
    if sass is not None:
        ops = collections.Counter(m.group(1) for m in re.finditer(
            r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
        facts["instructions"] = sum(ops.values())
        # tcgen05.mma (sm_100) lowers to UTCHMMA / UTCQMMA / UTCIMMA ...; wgmma to HGMMA.
        tcgen05 = any(op.startswith("UTC") and "MMA" in op for op in ops)
        kinds = [name for present, name in ((ops["HGMMA"], "wgmma"), (tcgen05, "tcgen05"),
                                            (ops["HMMA"], "mma.sync")) if present]
        facts["mma"] = "+".join(kinds) or "none"
    return facts


# ----------------------------------------------------------------------------------------------
# Per-target report: every config of each kernel
# ----------------------------------------------------------------------------------------------

def configs_of(kind, dtype, head_dim, target):
    """(configs to show, the one the runtime would choose there) for a long sequence."""
    es = TORCH_DTYPES[dtype].itemsize
    hd = flash_launch._head_dim(head_dim)
    if kind in FIXED_TILES:
        return [FIXED_TILES[kind]], FIXED_TILES[kind]
    base = "fwd" if kind == "decode" else kind  # a decode step: one query row, 64k keys
    tq = 1 if kind == "decode" else 1 << 16
    chosen = flash_configs.candidates(base, TORCH_DTYPES[dtype], hd, es, tq, 1 << 16, target)
    chosen = chosen[0] if chosen else None
    if kind == "decode":
        return [chosen] if chosen is not None else [], chosen
    shown = [c for c in flash_configs.CONFIGS[base]
             if flash_configs.fits_problem(c, hd, es, tq, 1 << 16)]
    return shown, chosen


def report(args, target):
    limit = target.shared_memory
    print(f"triton {triton.__version__}, target {target.label}, shared memory limit {limit} bytes "
          "per block")
    print(f"{'kernel':10s} {'dtype':5s} {'D':>3s} {'BMxBN':>7s} {'warps':>5s} {'stages':>6s} "
          f"{'regs':>4s} {'stack':>5s} {'shared':>7s} {'pipelined':>9s} {'instr':>6s} {'mma':>14s}  note")
    failures = 0
    show = lambda v: "?" if v is None else v  # noqa: E731
    for dtype in [DTYPES[d] for d in (args.dtype or ["bfloat16"])]:
        for kind in args.kernel or KERNELS:
            for D in args.head_dims:
                hd = flash_launch._head_dim(D)
                if kind == "fused" and not flash_launch._fused_backward(0, hd, TORCH_DTYPES[dtype]):
                    print(f"{kind:10s} {dtype:5s} {D:3d}  not used for this head dim and dtype "
                          "(two launches instead)")
                    continue
                shown, chosen = configs_of(kind, dtype, D, target)
                if args.fixed:
                    shown = [chosen] if chosen is not None else []
                if chosen is None:
                    print(f"{kind:10s} {dtype:5s} {D:3d}  no config fits this target: the runtime "
                          "sends such calls to PyTorch")
                for c in shown:
                    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                    head = (f"{kind:10s} {dtype:5s} {D:3d} {f'{bm}x{bn}':>7s} {c.num_warps:5d} "
                            f"{c.num_stages:6d}")
                    try:
                        f = inspect(compile_kernel(kind, dtype, D, c, target, args.dropout,
                                                   not args.nondeterministic, args.fp32_precision,
                                                   args.huge_scale, args.window, ROWS[args.rows],
                                                   args.right, args.softcap, args.sinks),
                                    target)
                    except Exception as e:  # report every variant, then fail at the end
                        failures += 1
                        print(f"{head}  FAILED to compile: {type(e).__name__}: {str(e).strip()[:200]}")
                        continue
                    notes = []
                    if f["shared"] > limit:
                        notes.append("too much shared memory for this target")
                        if c is chosen:
                            failures += 1  # the estimate let it through: it would fail to load
                    if c is chosen:
                        notes.append("the untuned choice")
                    if f["stack"]:
                        notes.append("spills")
                    print(f"{head} {show(f['regs']):>4} {show(f['stack']):>5} {f['shared']:7d} "
                          f"{'yes' if f['pipelined'] else 'no':>9s} {show(f['instructions']):>6} "
                          f"{show(f['mma']):>14}  {', '.join(notes)}")
    if failures:
        print(f"{failures} failure(s)")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# Portability: the runtime's choices on every target, with a verdict each
# ----------------------------------------------------------------------------------------------

TRAIN_T = 256  # the lecture's block size: its training step's sequence length


def runtime_plan(target, dtype, head_dim):
    """(why the runtime sends the call to PyTorch, or None; [(kernel, configs)] it compiles for
    the lecture's training step and a decode step) on `target`, as flash.supports(),
    flash.declines() and flash_launch choose on the device. configs: the kernel's candidates in
    the order the runtime tries them (autotune.first_that_loads: the first that compiles and
    loads is kept)."""
    tdtype, hd = TORCH_DTYPES[dtype], flash_launch._head_dim(head_dim)
    es = tdtype.itemsize
    why = (flash_configs.declined(target)
           or flash_configs.unsupported(target, str(tdtype).replace("torch.", ""), hd, es))
    if why is not None:
        return why, []
    bucket = flash_launch._bucket(TRAIN_T)

    def tried(kernel, tq=bucket, tk=bucket):
        return flash_configs.candidates(kernel, tdtype, hd, es, tq, tk, target)
    plan = [("fwd", tried("fwd"))]
    fused = tried("fused")
    if TRAIN_T <= flash_launch.FUSED_MAX_TK and hd <= 64 and es == 2 and fused:
        plan.append(("fused", fused))
    else:
        plan += [("dq", tried("dq")), ("dkdv", tried("dkdv"))]
    plan += [("decode", tried("fwd", tq=1)), ("combine", [FIXED_TILES["combine"]])]
    return None, plan


def _compile_one(job):
    """(job, facts or the error, compile seconds): one compile, in a worker process."""
    arch, kind, dtype, head_dim, shape = job
    target = devices.target(arch)
    bm, bn, warps, stages = shape
    t0 = time.process_time()
    try:
        kernel = compile_kernel(kind, dtype, head_dim, flash_configs._cfg(bm, bn, stages, warps),
                                target)
        return job, inspect(kernel, target), time.process_time() - t0
    except Exception as e:  # a first call pays for the failed compile too
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return job, f"{type(e).__name__}: {why}", time.process_time() - t0


def _why_not(facts, target):
    """Why a compiled config cannot run on target (None: it can): it did not compile (facts
    is the error), or it needs more shared memory than a block may have (it fails to load)."""
    if isinstance(facts, str):
        return f"does not compile ({facts})"
    if facts["shared"] > target.shared_memory:
        return f"needs {facts['shared']} bytes of shared memory"
    return None


def _compile_as_the_runtime(plans, jobs):
    """{(arch, dtype, D, kernel): [(config, facts or the error, seconds)]}: each planned
    kernel's candidates compiled in the order the runtime tries them, up to the first that
    compiles and fits (autotune.first_that_loads), round by round on `jobs` processes."""
    configs = {(arch, dtype, D, kind): candidates for (arch, dtype, D), (_, plan) in plans.items()
               for kind, candidates in plan}
    tried = {key: [] for key in configs}
    pending = list(configs)
    # A cache of its own, so that the compile seconds are what a first call pays (Triton's
    # cache may hold kernels an earlier run compiled).
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            while pending:
                nexts = [configs[key][len(tried[key])] for key in pending]
                work = [(arch, kind, dtype, D, flash_configs._shape(c))
                        for (arch, dtype, D, kind), c in zip(pending, nexts)]
                for key, c, (_, facts, seconds) in zip(pending, nexts, pool.map(_compile_one, work)):
                    tried[key].append((c, facts, seconds))
                pending = [key for key in pending if len(tried[key]) < len(configs[key])
                           and _why_not(tried[key][-1][1], devices.target(key[0]))]
    return tried


def portability(head_dims, jobs):
    plans = {(arch, dtype, D): runtime_plan(devices.target(arch), dtype, D)
             for arch in devices.PORTABILITY for dtype in ("fp16", "bf16", "fp32") for D in head_dims}
    tried = _compile_as_the_runtime(plans, jobs)
    print(f"triton {triton.__version__}: the configs the runtime chooses on each target, for the "
          f"lecture's training step (T = {TRAIN_T}) and a decode step (where a config does not "
          "compile or load, the next one it would try below it)")
    print(f"{'target':7s} {'dtype':5s} {'D':>3s} {'kernel':10s} {'BMxBN':>7s} {'warps':>5s} "
          f"{'stages':>6s} {'regs':>4s} {'spill':>5s} {'shared':>7s} {'limit':>7s} {'mma':>9s} "
          f"{'compile s':>9s}")
    show = lambda v: "?" if v is None else v  # noqa: E731
    failing, verdicts = 0, []
    for arch in devices.PORTABILITY:
        target = devices.target(arch)
        runs, detours, falls, fails, seconds, lecture = [], [], [], [], 0.0, None
        for dtype in ("fp16", "bf16", "fp32"):
            for D in head_dims:
                why, plan = plans[(arch, dtype, D)]
                if why is not None:
                    falls.append(f"{dtype} D {D}")
                    print(f"{target.label:7s} {dtype:5s} {D:3d} falls back to SDPA: {why}")
                    continue
                failed, detoured = [], []
                step = 0.0  # the training step's kernels (not decode's)
                for kind, _ in plan:
                    attempts = tried[(arch, dtype, D, kind)]
                    for c, facts, s in attempts:
                        seconds += s
                        step += s if kind not in ("decode", "combine") else 0.0
                        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        head = (f"{target.label:7s} {dtype:5s} {D:3d} {kind:10s} {f'{bm}x{bn}':>7s} "
                                f"{c.num_warps:5d} {c.num_stages:6d}")
                        if isinstance(facts, str):
                            print(f"{head}  FAILED to compile: {facts}")
                            continue
                        print(f"{head} {show(facts['regs']):>4} {show(facts['stack']):>5} "
                              f"{facts['shared']:7d} {target.shared_memory:7d} "
                              f"{show(facts['mma']):>9} {s:9.1f}"
                              f"{'  OVER THE LIMIT' if _why_not(facts, target) else ''}")
                    last, first_why = attempts[-1], _why_not(attempts[0][1], target)
                    if _why_not(last[1], target):  # no config left: the guard sends it to PyTorch
                        failed.append(f"{kind}: all {len(attempts)} configs fail (the first "
                                      f"{first_why})")
                    elif len(attempts) > 1:
                        c = last[0]
                        detoured.append(f"{kind}: {len(attempts) - 1} failed config(s) (the "
                                        f"first {first_why}), then {c.kwargs['BLOCK_M']}x"
                                        f"{c.kwargs['BLOCK_N']}, {c.num_warps} warps, "
                                        f"{c.num_stages} stage(s)")
                label = f"{dtype} D {D}"
                if failed:
                    fails.append(f"{label} ({'; '.join(failed)})")
                elif detoured:
                    detours.append(f"{label} ({'; '.join(detoured)})")
                else:
                    runs.append(label)
                if (dtype, D) == ("bf16", 64):  # the lecture's model, trained under autocast
                    lecture = step
        verdict = f"{target.label}: runs {', '.join(runs) or 'nothing'}"
        if detours:
            verdict += f"; runs after failed configs: {', '.join(detours)}"
        if falls:
            verdict += f"; falls back to SDPA for {', '.join(falls)}"
        if fails:
            verdict += f"; would fail: {', '.join(fails)}"
        failing += bool(detours or fails)
        verdict += f"; {seconds:.0f} s of compiling in all"
        if lecture is not None:
            verdict += f", {lecture:.1f} s for the lecture's first training step (bf16, D 64)"
        verdicts.append(verdict)
    print("\n== verdict ==")
    print("\n".join(verdicts))
    return 1 if failing else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=parse_arch, default=90,
                   help="compute capability x10 (75 T4, 80 A100, 86/89 RTX 30/40, 90 H100, 100 "
                        "B200, 120 RTX 50) or an AMD gfx name (gfx90a, gfx942); default 90")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default bfloat16)")
    p.add_argument("--head-dim", default=None,
                   help="comma-separated, 1..256 (default 64,128; with --portability 64,128,256)")
    p.add_argument("--kernel", action="append", choices=KERNELS, help="repeatable (default all)")
    p.add_argument("--dropout", action="store_true", help="the kernels with dropout compiled in")
    p.add_argument("--nondeterministic", action="store_true",
                   help="the dK/dV kernel of the deterministic=False backward (adds dQ atomically)")
    p.add_argument("--window", action="store_true",
                   help="the kernels a sliding window (causal_attention(window=...)) gets")
    p.add_argument("--right", action="store_true",
                   help="the kernels full attention or a window's right side gets (causal=False)")
    p.add_argument("--softcap", action="store_true", help="the kernels softcapping gets")
    p.add_argument("--sinks", action="store_true", help="the forward attention sinks get")
    p.add_argument("--rows", choices=["dense", "lengths", "cache", "packed"], default="dense",
                   help="how rows are found: dense (default), per-row key lengths (seqlens_k), "
                        "a decode cache's lengths, or packed sequences (cu_seqlens)")
    p.add_argument("--huge-scale", action="store_true",
                   help="the kernels |scale| > 1 gets (softmax guarded for huge scaled scores)")
    p.add_argument("--fp32-precision", choices=settings.FP32_PRECISIONS,
                   default=settings.resolve_fp32_precision(),
                   help="float32 dots (default: what a call gets now, %(default)s)")
    p.add_argument("--fixed", action="store_true",
                   help="only the config each kernel uses with autotuning off (the first that fits)")
    p.add_argument("--hopper", action="store_true",
                   help="instead, the opt-in sm_90 forward (kernels/hopper.py), with and without "
                        "warp specialisation: TMA loads, registers, spills")
    p.add_argument("--portability", action="store_true",
                   help="instead, every target of devices.PORTABILITY: the runtime's choices for the "
                        "lecture's training step and decode, and a verdict per target")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compile processes for --portability (default: one per core)")
    args = p.parse_args(argv)
    if args.head_dim is None:
        args.head_dim = "64,128,256" if args.portability else "64,128"
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
    if args.portability:
        return portability(args.head_dims, args.jobs)
    if isinstance(args.arch, str) and args.fp32_precision == "tf32":
        args.fp32_precision = "ieee"  # AMD's Triton has no tf32 dots: the runtime takes "ieee"
    return report(args, devices.target(args.arch))


if __name__ == "__main__":
    sys.exit(main())
