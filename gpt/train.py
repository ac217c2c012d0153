"""Train the lecture's GPT: python -m gpt.train --preset lecture|small|tiny [overrides].

Checkpoints (OUT_DIR/ckpt.pt) hold the model, optimizer, config, tokenizer, iteration and every
random state, so --resume continues exactly where the run stopped.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kernels import default_device

from .data import Batches, CharTokenizer, DataError, load_text
from .model import GPT, PRESETS, GPTConfig

MODEL_KEYS = ("block_size", "n_embd", "n_head", "n_layer", "dropout")
TRAIN_KEYS = ("batch_size", "lr", "max_iters", "eval_interval", "eval_iters")


class UsageError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="lecture")
    p.add_argument("--data", help="training text (default: $GPT_DATA, else Tiny Shakespeare)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 runs the model under autocast")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="out")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--backend", default="auto", help="attention backend (auto, triton, sdpa, reference)")
    p.add_argument("--sample-tokens", type=int, default=300, help="characters sampled at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for key in MODEL_KEYS + TRAIN_KEYS:  # None = take it from the checkpoint or the preset
        kind = float if key in ("dropout", "lr") else int
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None)
    return p.parse_args(argv)


def preset_settings(name):
    """Every hyperparameter of a preset (gpt/model.py's PRESETS): model shape and training run."""
    cfg = GPTConfig.from_preset(name)
    return {**{k: getattr(cfg, k) for k in MODEL_KEYS}, **PRESETS[name]["train"]}


def resolve(args, ckpt):
    """Hyperparameters: the command line, else the checkpoint being resumed, else the preset."""
    saved = ckpt["train_args"] if ckpt else {}
    preset = preset_settings(args.preset)
    out = {}
    for key in MODEL_KEYS + TRAIN_KEYS:
        given = getattr(args, key)
        out[key] = given if given is not None else saved.get(key, preset[key])
    return out


def rng_state(batches):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "data": batches.generator.get_state()}


def set_rng_state(state, batches):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    batches.generator.set_state(state["data"])


def save_checkpoint(path, obj):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, seed, autocast):
    """Mean loss over eval_iters batches of each split, drawn from a generator of its own."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for i in range(eval_iters):
            x, y = batches.get(split, generator=g)
            with autocast():
                _, loss = model(x, y)
            losses[i] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def prepare_out_dir(out_dir):
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to out-dir {out_dir}: {e.strerror or e}") from None
    return out_dir


def train(args):
    out_dir = prepare_out_dir(args.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = resolve(args, ckpt)
    device = default_device(args.device)
    torch.manual_seed(args.seed)

    text = load_text(args.data)
    tok = CharTokenizer.from_state_dict(ckpt["tokenizer"]) if ckpt else CharTokenizer.from_text(text)
    try:
        data = tok.encode(text)
    except ValueError as e:
        raise UsageError(f"the data does not fit the checkpoint's tokenizer: {e}") from None
    batches = Batches(data, hp["block_size"], hp["batch_size"], device, seed=args.seed)

    cfg = GPTConfig(vocab_size=tok.vocab_size, backend=args.backend,
                    **{k: hp[k] for k in MODEL_KEYS})
    if ckpt:
        cfg = GPTConfig(**{**ckpt["config"], "backend": args.backend})
    model = GPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"])
    start = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = hp["lr"]
        set_rng_state(ckpt["rng"], batches)
        start = ckpt["iter"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocab {tok.vocab_size}, device {device}, "
          f"{len(batches.splits['train'])} train tokens, starting at iter {start}", flush=True)
    step_model = torch.compile(model) if args.compile else model
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    def checkpoint(it):
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "backend"},
            "iter": it, "tokenizer": tok.state_dict(), "rng": rng_state(batches),
            "train_args": hp})

    bar = None if args.no_progress else tqdm(total=hp["max_iters"], initial=start, unit="it",
                                             dynamic_ncols=True)

    def evaluate(it):
        losses = estimate_loss(step_model, batches, hp["eval_iters"], args.seed + 1, autocast)
        msg = f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        (bar.write if bar else print)(msg)
        return losses

    tokens_per_step = hp["batch_size"] * hp["block_size"]
    t0, done = time.perf_counter(), 0
    for it in range(start, hp["max_iters"]):
        if it % hp["eval_interval"] == 0 and (it != start or start == 0):
            evaluate(it)  # a resumed run was evaluated at `start` before it stopped
            if it > 0:
                checkpoint(it)
        x, y = batches.get("train")
        with autocast():
            _, loss = step_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
        if bar is not None:
            bar.update(1)
            if it % 10 == 0:  # .item() waits for the GPU: not every step
                rate = done * tokens_per_step / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{rate:,.0f}")
    if bar is not None:
        bar.close()
    if done:
        rate = done * tokens_per_step / (time.perf_counter() - t0)
        print(f"{done} steps, {rate:,.0f} tokens/s", flush=True)
    losses = evaluate(hp["max_iters"])
    checkpoint(hp["max_iters"])
    print(f"checkpoint written to {ckpt_path}", flush=True)
    if args.sample_tokens > 0:
        g = torch.Generator(device=device).manual_seed(args.seed)
        model.eval()
        idx = torch.zeros((1, 1), dtype=torch.long, device=device)
        print(tok.decode(model.generate(idx, args.sample_tokens, generator=g)[0].tolist()))
    return model, losses


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; resume with --resume (the last checkpoint is in the out-dir)")


if __name__ == "__main__":
    main()
