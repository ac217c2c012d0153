"""The gpt_train section: one full training step (forward, backward, AdamW) of the lecture's GPT.

IMPLS is the registry: name -> Impl(build(cfg) -> model, compiled). Every implementation trains
the same model shape from the same seed on the same batch; tokens/s and MFU per dtype.
"""
import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lecture_flash.gpt import GPT, GPTConfig, MultiHeadAttention
from lecture_flash.gpt.lecture import GPTLanguageModel
from lecture_flash.gpt.model import PRESETS
from lecture_flash.gpt.step import WARMUP_STEPS, TrainStep, adamw, autocast

from harness import (log, measure, median_p20_p80, peak_memory_mb, print_rows, profile_steps,
                     progress, ratio_line, skipped_reason, sync)

VOCAB = 65  # Tiny Shakespeare's characters


@dataclasses.dataclass
class Impl:
    build: Callable  # GPTConfig -> nn.Module with forward(idx, targets) -> (logits, loss)
    compiled: bool = False  # torch.compile the model (not on a CPU with --quick: too slow)
    mode: str = None  # torch.compile's mode (None: its default)
    optimizer: str = "plain"  # see OPTIMIZERS
    graphs: bool = False  # the whole step captured in a CUDA graph (gpt.step.TrainStep)
    cuda_only: bool = False


def _lecture(cfg):
    return GPTLanguageModel(cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer,
                            cfg.dropout)


def _nanogpt_style(cfg):
    """Our model with nanoGPT's attention: one F.scaled_dot_product_attention(is_causal=True)
    call and nothing around it (no argument checks, no masking guards). A caller's attend
    (generation's KV cache) is still honoured."""
    model = GPT(cfg)
    for block in model.blocks:
        sa = block.sa

        def forward(x, attend=None, sa=sa):
            return MultiHeadAttention.forward(sa, x, attend or (lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=sa.attn_dropout if sa.training else 0.0,
                scale=sa.scale)))
        sa.forward = forward
    return model


# Each implementation's AdamW as its own code makes it: the lecture's torch.optim.AdamW with
# PyTorch's defaults; nanoGPT's (fused where it runs on CUDA, its configure_optimizers); ours
# (gpt.step.adamw, fused on every device, capturable for a captured step), as gpt.train runs.
OPTIMIZERS = {
    "plain": lambda params, device, graphs: torch.optim.AdamW(params, lr=3e-4),
    "nanogpt": lambda params, device, graphs: torch.optim.AdamW(params, lr=3e-4,
                                                                fused=device.type == "cuda"),
    "project": lambda params, device, graphs: adamw(params, device, graphs, lr=3e-4),
}

IMPLS = {
    "lecture": Impl(_lecture),  # the lecture's per-head model
    "sdpa-batched": Impl(_nanogpt_style, optimizer="nanogpt"),
    # nanoGPT's train.py compiles with the default mode; reduce-overhead adds inductor's own
    # CUDA graphs (forward and backward, the optimizer outside): the better of the two is its
    # best compiled mode.
    "sdpa-compiled": Impl(_nanogpt_style, compiled=True, optimizer="nanogpt"),
    "sdpa-compiled:reduce-overhead": Impl(_nanogpt_style, compiled=True, mode="reduce-overhead",
                                          optimizer="nanogpt", cuda_only=True),
    "project": Impl(GPT, optimizer="project"),  # python -m gpt.train
    "project-compiled": Impl(GPT, compiled=True, optimizer="project"),  # ... --compile --no-cuda-graphs
    "project-graphed": Impl(GPT, compiled=True, optimizer="project", graphs=True,
                            cuda_only=True),  # ... --compile (on CUDA: the step is one graph)
}
BASELINE, ALTERNATIVE = "lecture", "sdpa-batched"  # what the report's ratios are against
NANOGPT_STYLE = ("sdpa-batched", "sdpa-compiled", "sdpa-compiled:reduce-overhead")


def preset(device, name=None):
    """The lecture's model on a GPU, its first ("small") config on a CPU, or the preset named
    (evidence.py's tiny one on a CPU): (name, cfg, batch)."""
    name = name or ("lecture" if device.type == "cuda" else "small")
    return name, GPTConfig.from_preset(name, vocab_size=VOCAB), PRESETS[name]["train"]["batch_size"]


def matmul_peak_tflops(device, dtype):
    """Peak of a large matmul measured in this run (the MFU denominator)."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = measure(lambda: a @ b, device)[0]
    return 2 * n**3 / ms / 1e9


def make_step(impl, cfg, batch, device, amp):
    """A warmed-up closure doing one full training step, and the model's parameter count."""
    torch.manual_seed(0)
    model = impl.build(cfg).to(device)
    step_model = torch.compile(model, mode=impl.mode) if impl.compiled else model
    opt = OPTIMIZERS[impl.optimizer](model.parameters(), device, impl.graphs)
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)
    run = TrainStep(step_model, opt, autocast(device, amp, impl.graphs), graphs=impl.graphs)

    def step():
        run(x, y)
    for _ in range(WARMUP_STEPS + 2):
        step()  # warm-up (compilation; with graphs, the capture)
    sync(device)
    return step, sum(p.numel() for p in model.parameters())


def run(opts, rows, save):
    """Time a training step of every implementation, per dtype, appending to `rows`; with
    opts.profile_dir, also profile each (harness.profile_steps)."""
    device, quick, profile_dir = opts.device, opts.quick, opts.profile_dir
    preset_name, cfg, B = preset(device, getattr(opts, "preset", None))
    T, L, H = cfg.block_size, cfg.n_layer, cfg.n_head
    runs = [("float32", None)] if device.type == "cpu" else [("bfloat16", torch.bfloat16),
                                                             ("float32", None)]
    if getattr(opts, "dtypes_given", False):  # --dtype: those of them it names
        named = {str(d).replace("torch.", "") for d in opts.dtypes}
        runs = [(name, amp) for name, amp in (("bfloat16", torch.bfloat16), ("float32", None))
                if name in named]
        if not runs:
            log("  gpt_train: runs in bfloat16 (autocast) or float32; --dtype names neither")
    bar = progress(2 * len(runs) * len(IMPLS), "gpt_train")
    for dtype_name, amp in runs:
        peak = matmul_peak_tflops(device, amp or torch.float32) if device.type == "cuda" else None
        steps, skipped = {}, {}
        for name, impl in IMPLS.items():
            bar.update(1)
            if impl.cuda_only and device.type != "cuda":
                skipped[name] = "CUDA only"
                continue
            if impl.compiled and quick and device.type == "cpu":
                skipped[name] = "compiling takes longer than --quick allows on a CPU"
                continue
            try:
                steps[name] = make_step(impl, cfg, B, device, amp)
            except Exception as e:
                skipped[name] = skipped_reason(e)
        timed = {}  # name -> (median, p20, p80) ms
        if device.type == "cuda":
            for name, (step, _) in steps.items():
                timed[name] = measure(step, device)
        else:  # round-robin, so that drift on a shared CPU hits every implementation alike
            times = {name: [] for name in steps}
            for _ in range(5 if quick else 10):
                for name, (step, _) in steps.items():
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            timed = {name: median_p20_p80(t) for name, t in times.items()}
        for name in IMPLS:
            bar.update(1)
            if name in skipped:
                rows.append(dict(impl=name, dtype=dtype_name, preset=preset_name,
                                 skipped=skipped[name]))
                continue
            step, n_params = steps[name]
            ms, p20, p80 = timed[name]
            flops_per_token = 6 * n_params + 12 * L * H * (cfg.n_embd // H) * T  # PaLM's, as nanoGPT
            tok_s = B * T / (ms / 1e3)
            rows.append(dict(impl=name, dtype=dtype_name, preset=preset_name, tokens_per_s=tok_s,
                             ms_per_iter=ms, ms_p20=p20, ms_p80=p80,
                             mfu=flops_per_token * tok_s / (peak * 1e12) if peak else None,
                             peak_mem_mb=peak_memory_mb(step, device), B=B, T=T,
                             mfu_peak=f"measured 8192^3 {dtype_name} matmul: {peak:.0f} TFLOP/s"
                             if peak else None))
            log(f"  gpt_train {dtype_name} {name}: {ms:.1f} ms/iter, {tok_s:,.0f} tokens/s")
            if profile_dir is not None:
                found = profile_steps(step, device,
                                      profile_dir / f"profile-gpt_train-{dtype_name}-{name}.txt")
                rows[-1].update(found)
                log("    profile: " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()))
        del steps
        save()
    bar.close()


def _model(rows):
    name = next((r["preset"] for r in rows if "preset" in r), "lecture")
    cfg, B = GPTConfig.from_preset(name), PRESETS[name]["train"]["batch_size"]
    return (f"the {name} preset: batch {B}, block {cfg.block_size}, {cfg.n_embd} wide, "
            f"{cfg.n_head} heads, {cfg.n_layer} layers")


def print_table(rows, opts):
    if rows:
        print_rows(f"gpt_train (full step: forward, backward, AdamW; {_model(rows)})", rows,
                   "tokens_per_s", baseline=BASELINE, alternative=ALTERNATIVE)


def verdict(rows, opts):
    """Per dtype: our rows against the lecture and nanoGPT-style eager SDPA, and our best row
    against the best nanoGPT-style row."""
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        rs = [r for r in rows if r["dtype"] == dtype]
        for impl in ("project", "project-compiled", "project-graphed"):
            line = ratio_line(f"training ({dtype})", rs, "tokens_per_s", impl,
                              (BASELINE, ALTERNATIVE))
            if line:
                lines.append(line + " (nanoGPT-style SDPA)")
        best = {}
        for r in rs:
            if r.get("tokens_per_s"):
                family = "nanogpt" if r["impl"] in NANOGPT_STYLE else "project" if r["impl"].startswith("project") else None
                if family and r["tokens_per_s"] > best.get(family, (0, ""))[0]:
                    best[family] = (r["tokens_per_s"], r["impl"])
        if len(best) == 2:
            (ours, a), (theirs, b) = best["project"], best["nanogpt"]
            lines.append(f"training ({dtype}): best of ours ({a}) {ours / theirs:.2f}x the best "
                         f"nanoGPT-style row ({b})")
    return lines
