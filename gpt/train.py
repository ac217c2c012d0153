"""Train the lecture's GPT: lecture-flash-train --preset lecture|small|tiny|speedrun [overrides]
(or python -m lecture_flash.gpt.train ...).

Checkpoints (OUT_DIR/ckpt.pt) hold the model, optimizer, config, tokenizer, iteration and every
random state, so --resume continues exactly where the run stopped.

More than one GPU (or CPU process): torchrun --nproc_per_node=N -m lecture_flash.gpt.train ...
trains with DistributedDataParallel (NCCL on CUDA, gloo on CPU; several nodes through torchrun's
usual --nnodes/--rdzv options). --batch-size is per process: N processes at batch B train on what one
at N * B would. Rank 0 alone evaluates, logs and writes the checkpoint; --resume restores every
rank.
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

from lecture_flash import default_device
from lecture_flash.validation import BACKENDS

from . import checkpoint
from .data import Batches, CharTokenizer, DataError, load_text
from .step import (DDP_WARMUP_STEPS, WARMUP_STEPS, Captured, TrainStep, adamw, adamw_lr,
                   set_lr)
from .step import autocast as step_autocast
from .context import ContextParallel
from .model import GPT, PRESETS, TRAIN_DEFAULTS, GPTConfig

MODEL_KEYS = ("block_size", "n_embd", "n_head", "n_layer", "dropout")
TRAIN_KEYS = ("batch_size", "lr", "max_iters", "eval_interval", "eval_iters", "warmup_iters",
              "min_lr", "beta2", "weight_decay", "target_loss")
FLOAT_KEYS = ("dropout", "lr", "min_lr", "beta2", "weight_decay", "target_loss")


class UsageError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


class Diverged(Exception):
    """The loss or the weights stopped being finite; the last good checkpoint was kept."""


def prog_name(command):
    """How the user started us: lecture-flash-<command> (the console script) or python -m lecture_flash.gpt.<command>."""
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("lecture-flash-") else f"python -m lecture_flash.gpt.{command}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=prog_name("train"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="lecture",
                   help="model shape and training run (default: %(default)s, the lecture's final "
                        "gpt.py: hours on a CPU; tiny trains in seconds)")
    p.add_argument("--data", help="training text, UTF-8 (default: $GPT_DATA, else Tiny Shakespeare, "
                   "downloaded once into ~/.cache/lecture-flash; offline, pass --data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="bfloat16 runs the model under autocast (default float32; the speedrun "
                        "preset's bfloat16 on CUDA)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="out")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    start.add_argument("--overwrite", action="store_true",
                       help="start over even if OUT_DIR/ckpt.pt exists (it is replaced at the first save)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default off; on for the speedrun preset on CUDA)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the whole training step (forward, backward, AdamW; under "
                        "torchrun the gradient all-reduce too) and the evaluation's forward in "
                        "CUDA graphs and replay them (default: on with --compile on CUDA)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="attention backend")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: shard every sequence over groups of N processes, which "
                        "attend through a ring (lecture_flash.context_parallel); the processes "
                        "are WORLD_SIZE / N data-parallel groups of N (default 1: none)")
    p.add_argument("--sample-tokens", type=int, default=300, help="characters sampled at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for key in MODEL_KEYS + TRAIN_KEYS:  # None = take it from the checkpoint or the preset
        kind = float if key in FLOAT_KEYS else int
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=TRAIN_HELP.get(key))
    return p.parse_args(argv)


def _flag(key):
    return "--" + key.replace("_", "-")


def check_args(args):
    """The command line's own values, before anything is loaded or built."""
    at_least = dict(batch_size=1, block_size=1, n_embd=1, n_head=1, n_layer=1, max_iters=0,
                    eval_interval=1, eval_iters=1, warmup_iters=0, weight_decay=0.0)
    for key, low in at_least.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise UsageError(f"{_flag(key)} must be at least {low}, got {value}")
    if args.sample_tokens < 0:
        raise UsageError(f"--sample-tokens must be at least 0, got {args.sample_tokens}")
    for key in ("lr", "min_lr"):
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_flag(key)} must be a positive finite number, got {value}")
    if args.beta2 is not None and not 0.0 <= args.beta2 < 1.0:
        raise UsageError(f"--beta2 must be in [0, 1), got {args.beta2}")
    if args.target_loss is not None and not math.isfinite(args.target_loss):
        raise UsageError(f"--target-loss must be a finite number, got {args.target_loss}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    device = device_of(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device, got {device}")
    if args.context_parallel < 1:
        raise UsageError(f"--context-parallel must be at least 1, got {args.context_parallel}")
    if args.context_parallel > 1 and (args.compile or args.cuda_graphs):
        raise UsageError("--context-parallel runs eager: pass --no-compile --no-cuda-graphs "
                         "(the ring's exchanges are not captured or compiled yet)")
    return device


def device_of(name):
    """torch.device for --device, or a one-line error."""
    try:
        device = default_device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def preset_settings(name):
    """Every hyperparameter of a preset (gpt/model.py's PRESETS): model shape and training run."""
    cfg = GPTConfig.from_preset(name)
    return {**{k: getattr(cfg, k) for k in MODEL_KEYS}, **TRAIN_DEFAULTS, **PRESETS[name]["train"]}


TRAIN_HELP = {
    "warmup_iters": "steps of linear lr warm-up (default 0)",
    "min_lr": "cosine-decay the lr to this by --max-iters (default: constant lr)",
    "beta2": "AdamW's beta2 (default 0.999)",
    "weight_decay": "AdamW's weight decay (default 0.01)",
    "target_loss": "stop once an evaluation's val loss is at most this, and say how long it took",
}


def lr_at(it, hp):
    """The learning rate of step `it`: linear warm-up over warmup_iters, then constant, or with
    min_lr a cosine decay from lr to min_lr at max_iters (nanoGPT's schedule)."""
    lr, warmup = hp["lr"], hp["warmup_iters"]
    if it < warmup:
        return lr * (it + 1) / warmup
    if hp["min_lr"] is None:
        return lr
    span = max(hp["max_iters"] - warmup, 1)
    done = min(max(it - warmup, 0) / span, 1.0)
    return hp["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * done)) * (lr - hp["min_lr"])


def run_settings(args, device):
    """(dtype, compile, cuda_graphs): the flags, else the preset's defaults on CUDA, else
    float32, eager. CUDA graphs default to on with compile on CUDA."""
    run = PRESETS[args.preset].get("run", {}) if device.type == "cuda" else {}
    dtype = args.dtype or run.get("dtype", "float32")
    # (context parallelism runs eager: a preset's compile default does not apply to it)
    compile_model = args.compile if args.compile is not None else (
        run.get("compile", False) and args.context_parallel == 1)
    graphs = args.cuda_graphs  # checked in check_args
    if graphs is None:
        graphs = compile_model and device.type == "cuda"
    return dtype, compile_model, graphs


def resolve(args, ckpt):
    """Hyperparameters: the command line, else the checkpoint being resumed, else the preset.
    A resumed run keeps its model: a flag that contradicts the checkpoint's is refused, and so
    is a --max-iters below the iteration it reached."""
    saved = ckpt["train_args"] if ckpt else {}
    preset = preset_settings(args.preset)
    out = {}
    for key in MODEL_KEYS + TRAIN_KEYS:
        given = getattr(args, key)
        out[key] = given if given is not None else saved.get(key, preset[key])
    if ckpt:
        model = ckpt["config"]
        for key in MODEL_KEYS:
            given = getattr(args, key)
            if given is not None and given != model[key]:
                raise UsageError(f"{_flag(key)} {given} contradicts the checkpoint's model "
                                 f"({key} {model[key]}); leave it out to resume")
            out[key] = model[key]
        if out["max_iters"] < ckpt["iter"]:
            raise UsageError(f"--max-iters {out['max_iters']} is below the checkpoint's iteration "
                             f"{ckpt['iter']}: a resumed run never goes back (--overwrite starts over)")
    return out


def rng_state(batches):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "data": batches.generator.get_state()}


def set_rng_state(state, batches, own=True):
    """Restore the data stream's generator, and with own (the state is this process's) torch's."""
    if own:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    batches.generator.set_state(state["data"])


@torch.no_grad()
def estimate_loss(model, forward, batches, eval_iters, seed, progress=False,
                  splits=("train", "val")):
    """Mean loss over eval_iters batches of each split, drawn from a generator of its own, with
    model in eval mode and forward(x, y) -> the batch's loss (a captured one with
    --cuda-graphs). The losses stay on the device until the split's mean is read: one host sync
    per split, not one per batch (an evaluation of the lecture's 200 batches waited on the GPU
    400 times). splits: which to evaluate."""
    model.eval()
    out = {}
    bar = tqdm(total=len(splits) * eval_iters, desc="evaluating", unit="batch", leave=False,
               dynamic_ncols=True, disable=not progress)
    for split in splits:
        g = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters, device=batches.device)
        for i in range(eval_iters):
            x, y = batches.get(split, generator=g)
            losses[i] = forward(x, y)  # (a copy: a captured forward overwrites its loss)
            bar.update(1)
        out[split] = losses.mean().item()
    bar.close()
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


def all_finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


@contextlib.contextmanager
def whole_sequences(model):
    """The model on whole sequences for a while (rank 0's evaluation: the other ranks of its
    context-parallel group are not there to share them)."""
    saved, model.context = model.context, None
    try:
        yield
    finally:
        model.context = saved


class Distributed:
    """This process's place in a torchrun job (rank, world_size, local_rank), or a single
    process (rank 0 of 1). Data-parallel collectives go through torch.distributed. With
    context=N the processes are world_size / N data-parallel groups of N consecutive ranks
    that share each sequence (context parallelism): dp_rank, dp_size, cp_rank, cp_group."""

    def __init__(self, device, context=1):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if context > 1 and self.world_size % context:
            raise UsageError(f"--context-parallel {context} must divide the number of processes "
                             f"({self.world_size}; torchrun --nproc_per_node sets it)")
        self.context = context
        self.dp_size, self.dp_rank = self.world_size // context, self.rank // context
        self.cp_rank, self.cp_group = self.rank % context, None
        if self.world_size > 1:
            if device.type == "cuda":  # one GPU per process, the local rank's
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if context > 1:  # every process makes every group, in the same order
                for first in range(0, self.world_size, context):
                    group = torch.distributed.new_group(list(range(first, first + context)))
                    if first == self.dp_rank * context:
                        self.cp_group = group

    @property
    def main(self):
        return self.rank == 0

    def mean(self, value):
        """A float's mean over the processes (a collective: every rank calls it)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world_size

    def gather(self, obj):
        """Every rank's obj, in rank order, on every rank (a collective)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self):
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(args, build_model=GPT, report=None):
    """Train as the command line says; (model, the last evaluation's losses on rank 0).
    build_model(cfg) -> the model (bench/speedrun.py passes nanoGPT-style attention); report, a
    dict, gets "target_step", "target_seconds" and "target_val" where the target was reached."""
    device = check_args(args)
    t_start = time.perf_counter()  # the speedrun's clock: data, model, compile and training
    text = load_text(args.data)  # first: a missing --data is the first thing to say
    created = not Path(args.out_dir).exists()
    ddp = Distributed(device, args.context_parallel)
    try:
        return _train(args, ddp, build_model, {} if report is None else report, text, t_start)
    except BaseException:
        if created:  # a failed start leaves no empty out-dir behind
            with contextlib.suppress(OSError):
                Path(args.out_dir).rmdir()  # only if empty
        raise
    finally:
        ddp.close()


def finished(ckpt, hp):
    """Why the run a checkpoint holds is finished for these hyperparameters, or None: it reached
    --max-iters, or the --target-loss (no stricter one asked now)."""
    if ckpt["iter"] >= hp["max_iters"]:
        return (f"iteration {ckpt['iter']} of --max-iters {hp['max_iters']}; a larger "
                "--max-iters trains it further")
    val = ckpt.get("reached_val")
    if val is not None and hp["target_loss"] is not None and val <= hp["target_loss"]:
        return (f"its val loss {val:.4f} reached --target-loss {hp['target_loss']} at iteration "
                f"{ckpt['iter']}; a lower --target-loss trains it further")
    return None


def _train(args, ddp, build_model, report, text, t_start):
    device = ddp.device
    out_dir = prepare_out_dir(args.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    checkpoint.remove_stale_temporaries(ckpt_path)  # left by a write that was interrupted
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = checkpoint.load_train_checkpoint(ckpt_path)
    elif ckpt_path.exists() and not args.overwrite:
        raise UsageError(f"{ckpt_path} already holds a checkpoint: --resume continues it, "
                         "--overwrite starts over")
    hp = resolve(args, ckpt)
    say = print if ddp.main else (lambda *a, **k: None)  # rank 0 alone logs
    done_why = ckpt and finished(ckpt, hp)
    if done_why:  # nothing to train: say so and change nothing (no evaluation, save, sample)
        say(f"{ckpt_path} holds a finished run, nothing to do: {done_why}", flush=True)
        return None, None
    if device.type == "cpu" and args.preset == "lecture" and not args.resume:
        say("note: the lecture preset takes hours on a CPU; --preset tiny trains in seconds",
            flush=True)
    torch.manual_seed(args.seed + ddp.rank)  # dropout draws differ between processes

    tok = CharTokenizer.from_state_dict(ckpt["tokenizer"]) if ckpt else CharTokenizer.from_text(text)
    try:
        data = tok.encode(text)
    except ValueError as e:
        raise UsageError(f"the data does not fit the checkpoint's tokenizer: {e}") from None
    # A context-parallel group shares its batches: the data splits over the dp_size groups.
    batches = Batches(data, hp["block_size"], hp["batch_size"], device, seed=args.seed,
                      rank=ddp.dp_rank, world_size=ddp.dp_size)
    # Rank 0 evaluates alone, on the batches one process would (dp_size x batch_size).
    eval_batches = batches if ddp.world_size == 1 else Batches(
        data, hp["block_size"], hp["batch_size"] * ddp.dp_size, device, seed=args.seed)

    try:
        cfg = GPTConfig(**{**ckpt["config"], "backend": args.backend}) if ckpt else GPTConfig(
            vocab_size=tok.vocab_size, backend=args.backend, **{k: hp[k] for k in MODEL_KEYS})
    except ValueError as e:  # e.g. --n-embd not divisible by --n-head
        raise UsageError(str(e)) from None
    model = build_model(cfg).to(device)
    dtype, compile_model, graphs = run_settings(args, device)
    optimizer = adamw(model.parameters(), device, graphs, lr=hp["lr"], betas=(0.9, hp["beta2"]),
                      weight_decay=hp["weight_decay"])
    start = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # a tensor where the step is captured
            group["lr"] = adamw_lr(hp["lr"], device, graphs)
        ranks = ckpt["rng"].get("ranks")  # per-process states of a data-parallel run
        written_by = len(ranks) if ranks else 1
        if written_by != ddp.world_size:
            say(f"note: the checkpoint was written by {written_by} process(es), this run has "
                f"{ddp.world_size}: the data stream continues exactly, dropout draws do not",
                flush=True)
        state = {**ckpt["rng"], **(ranks[ddp.rank] if ranks and written_by == ddp.world_size else {})}
        set_rng_state(state, batches, own=written_by == ddp.world_size)
        start = ckpt["iter"]
    saved_at = start if ckpt else None  # the iteration of the checkpoint on disk from this run
    n_params = sum(p.numel() for p in model.parameters())
    where = f"{ddp.world_size} processes" if ddp.world_size > 1 else f"device {device}"
    if ddp.context > 1:
        where += f" ({ddp.dp_size} data-parallel x {ddp.context} context-parallel)"
        model.context = ContextParallel(ddp.cp_group, ddp.context, ddp.cp_rank)
    say(f"{n_params / 1e6:.2f}M parameters, vocab {tok.vocab_size}, {where}, "
        f"{len(batches.splits['train'])} train tokens, starting at iter {start}", flush=True)
    step_model = model
    if ddp.world_size > 1:  # gradients averaged over the processes in the backward
        # For a captured step, PyTorch's CUDA-graph notes ask that DDP be built on a side
        # stream and warmed up for DDP_WARMUP_STEPS eager iterations before the capture.
        side = torch.cuda.Stream() if graphs else None
        with torch.cuda.stream(side) if side else contextlib.nullcontext():
            step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if side:
            torch.cuda.current_stream().wait_stream(side)
    step_model = torch.compile(step_model) if compile_model else step_model
    # Evaluation runs on rank 0 alone, so never through DDP (whose forward syncs buffers).
    eval_model = step_model if ddp.world_size == 1 else (
        torch.compile(model) if compile_model else model)
    amp_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    autocast = step_autocast(device, amp_dtype, graphs)
    train_step = TrainStep(step_model, optimizer, autocast, graphs,
                           warmup=DDP_WARMUP_STEPS if ddp.world_size > 1 else WARMUP_STEPS)

    def eval_loss(x, y):
        with autocast(), whole_sequences(model):
            return eval_model(x, y)[1]
    # Captured too: an evaluation of the lecture's run is 400 forwards.
    eval_forward = Captured(eval_loss) if graphs else eval_loss

    def stop_if_diverged(it, what):
        kept = (f"kept the checkpoint of iteration {saved_at} in {ckpt_path}" if saved_at is not None
                else "no checkpoint was written")
        raise Diverged(f"{what} at iteration {it}: stopped, {kept} (a smaller --lr may help)")

    def save(it, losses=None):
        """Every rank calls it (their random states are gathered); rank 0 writes. losses: the
        evaluation that reached --target-loss, which marks the run finished."""
        rng = rng_state(batches)
        ranks = ddp.gather({"torch": rng["torch"], "cuda": rng["cuda"]})
        if not ddp.main:
            return
        if not all_finite(model):
            stop_if_diverged(it, "the weights are not finite")
        if ddp.world_size > 1:
            rng["ranks"] = ranks
        checkpoint.save(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "backend"},
            "iter": it, "tokenizer": tok.state_dict(), "rng": rng, "train_args": hp,
            **({"reached_val": losses["val"]} if losses else {})})
        nonlocal saved_at
        saved_at = it

    bar = None if args.no_progress or not ddp.main else tqdm(
        total=hp["max_iters"], initial=start, unit="it", dynamic_ncols=True)

    # A run to a target loss (the speedrun) evaluates the val split alone: its stopping rule
    # reads nothing else, and the train split would double the evaluations' share of its clock.
    splits = ("val",) if hp["target_loss"] is not None else ("train", "val")

    def evaluate(it):
        """Rank 0's estimate (the other ranks go on to the next step and wait for it there)."""
        if not ddp.main:
            return None
        losses = estimate_loss(eval_model, eval_forward, eval_batches, hp["eval_iters"],
                               args.seed + 1, progress=bar is not None, splits=splits)
        msg = f"step {it}: " + ", ".join(f"{s} loss {losses[s]:.4f}" for s in splits)
        if bar is None:
            print(msg, flush=True)
        else:
            bar.write(msg)
        if not all(math.isfinite(v) for v in losses.values()):
            stop_if_diverged(it, "the loss is not finite")
        return losses

    def reached(it, losses):
        """Whether the target loss is reached (decided on rank 0, the same on every rank)."""
        target = hp["target_loss"]
        if target is None:
            return False
        hit = ddp.main and losses["val"] <= target
        if ddp.mean(float(hit)) == 0.0:
            return False
        seconds = time.perf_counter() - t_start
        report.update(target_step=it, target_seconds=seconds, target_val=losses and losses["val"])
        say(f"reached val loss {losses['val']:.4f} <= {target} at step {it}: "
            f"{seconds:.1f} s from the start (compile included)", flush=True)
        return True

    scheduled = hp["warmup_iters"] > 0 or hp["min_lr"] is not None
    tokens_per_step = hp["batch_size"] * hp["block_size"] * ddp.dp_size
    t0, done, stopped = time.perf_counter(), 0, None
    for it in range(start, hp["max_iters"]):
        if it % hp["eval_interval"] == 0 and (it != start or start == 0):
            losses = evaluate(it)  # a resumed run was evaluated at `start` before it stopped
            hit = reached(it, losses)
            if it > 0 or hit:  # (a new run's step 0 is its random start: kept only as a result)
                save(it, losses if hit else None)
            if hit:
                stopped = it
                break
        if scheduled:
            set_lr(optimizer, lr_at(it, hp))
        x, y = batches.get("train")
        loss = train_step(x, y)
        done += 1
        if done % 10 == 0 or it + 1 == hp["max_iters"]:  # .item() waits for the GPU: not every step
            value = ddp.mean(loss.item())  # the same on every rank, so all stop together
            if not math.isfinite(value):
                stop_if_diverged(it + 1, f"the loss is {value}")
            rate = done * tokens_per_step / (time.perf_counter() - t0)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:,.0f}")
            elif done == 10 and hp["max_iters"] - it > 10:
                left = (hp["max_iters"] - it - 1) * tokens_per_step / rate
                print(f"{rate:,.0f} tokens/s: about {left / 60:.1f} min of training to go "
                      "(evaluations not counted)", flush=True)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if done:
        rate = done * tokens_per_step / (time.perf_counter() - t0)
        say(f"{done} steps, {rate:,.0f} tokens/s", flush=True)
    if stopped is None:
        losses = evaluate(hp["max_iters"])
        hit = reached(hp["max_iters"], losses)
        save(hp["max_iters"], losses if hit else None)
        if hp["target_loss"] is not None and not hit:
            say(f"the val loss did not reach {hp['target_loss']} in {hp['max_iters']} steps",
                flush=True)
    say(f"checkpoint written to {ckpt_path}", flush=True)
    model.context = None  # whole sequences from here on (sampling, the caller's use)
    if args.sample_tokens > 0 and ddp.main:
        g = torch.Generator(device=device).manual_seed(args.seed)
        model.eval()
        idx = torch.zeros((1, 1), dtype=torch.long, device=device)
        print(tok.decode(model.generate(idx, args.sample_tokens, generator=g)[0].tolist()))
    return model, losses


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, DataError, checkpoint.CheckpointError, Diverged) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        ckpt_path = Path(args.out_dir) / "ckpt.pt"
        if ckpt_path.is_file():
            sys.exit(f"interrupted; {ckpt_path} holds the last checkpoint: --resume continues it")
        sys.exit("interrupted before the first checkpoint was written: nothing to resume")


if __name__ == "__main__":
    main()
