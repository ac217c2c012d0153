"""The generate section: tokens/s of sampling at batch 1, the lecture's generate against ours.

IMPLS is the registry: name -> Run(model, prompt_len(block_size), new_tokens(block_size, n)).
"project" is a whole run as a user makes it (a one-token prompt, n new tokens); the two
"project:" rows time its two regimes apart: ":cache" only positions that fit in block_size (the
KV cache), ":window" only tokens past block_size (one forward over the full window each).
"""
import dataclasses
import time
from typing import Callable

import torch

import gpt_train
from harness import log, print_rows, progress, ratio_line, skipped_reason, sync


@dataclasses.dataclass
class Run:
    model: str  # the bench/gpt_train.py implementation that builds the model
    prompt_len: Callable  # block_size -> prompt tokens
    new_tokens: Callable  # (block_size, n) -> tokens to generate
    compile: bool = False  # generate(compile=True): torch.compile of the per-token steps
    cuda_only: bool = False


IMPLS = {
    "lecture": Run("lecture", lambda bs: 1, lambda bs, n: n),
    "project": Run("project", lambda bs: 1, lambda bs, n: n),
    "project:cache": Run("project", lambda bs: 1, lambda bs, n: bs - 1),
    "project:window": Run("project", lambda bs: bs, lambda bs, n: min(n, 4 * bs)),
    # (on a CPU torch.compile made the small preset's step no faster, and compiling is slow)
    "project-compiled": Run("project", lambda bs: 1, lambda bs, n: n, compile=True, cuda_only=True),
}


def run(opts, rows, save):
    """Time generation for every entry of IMPLS, appending to `rows`."""
    device = opts.device
    preset_name, cfg, _ = gpt_train.preset(device, getattr(opts, "preset", None))
    bs = cfg.block_size
    n = 2000 if device.type == "cuda" else (300 if opts.quick else 1000)
    bar = progress(len(IMPLS), "generate")
    for name, spec in IMPLS.items():
        bar.update(1)
        if spec.cuda_only and device.type != "cuda":
            rows.append(dict(impl=name, skipped="CUDA only"))
            continue
        prompt_len, new = spec.prompt_len(bs), spec.new_tokens(bs, n)
        torch.manual_seed(0)
        model = gpt_train.IMPLS[spec.model].build(cfg).to(device).eval()
        idx = torch.randint(cfg.vocab_size, (1, prompt_len), device=device)
        try:
            g = torch.Generator(device=device).manual_seed(0)
            options = dict(generator=g, compile=True) if spec.compile else dict(generator=g)
            model.generate(idx, min(new, 2 * bs + 2), **options)  # warm-up, through both regimes
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(idx, new, **options)
            sync(device)
            dt = time.perf_counter() - t0
        except Exception as e:
            rows.append(dict(impl=name, skipped=skipped_reason(e)))
            continue
        assert out.shape == (1, prompt_len + new)
        rows.append(dict(impl=name, preset=preset_name, tokens_per_s=new / dt, new_tokens=new,
                         prompt_tokens=prompt_len, block_size=bs, n_layer=cfg.n_layer,
                         n_embd=cfg.n_embd))
        log(f"  generate {name}: {new} tokens, {new / dt:,.1f} tokens/s")
        save()
    bar.close()


def print_table(rows, opts):
    if not rows:
        return
    r = next((r for r in rows if "block_size" in r), {})
    print_rows(f"generate (batch 1, the {r.get('preset', '?')} preset: block {r.get('block_size', '?')})",
               rows, "tokens_per_s")
    print("(project: a whole run from a one-token prompt; project:cache: only the positions that fit "
          "in block_size, one new position a step on the KV cache; project:window: only tokens past "
          "block_size, a full-window forward a step, as the lecture's crop needs)")


def verdict(rows, opts):
    line = ratio_line("generation", rows, "tokens_per_s", "project", ("lecture",))
    return [line + " (its generate, the same distribution)"] if line else []
