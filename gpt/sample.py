"""Sample from a trained GPT: lecture-flash-sample --ckpt PATH [--prompt TEXT] ...
(or python -m lecture_flash.gpt.sample ...).

PATH is a checkpoint written by lecture-flash-train, or a raw state dict saved by the lecture's
gpt.py (torch.save(model.state_dict(), ...)); for the latter, pass --vocab-from with the text it
was trained on (to rebuild its tokenizer). The model's shape is read off the state dict's tensors.
Checkpoints are loaded with torch.load(weights_only=True): a file that holds anything but
tensors and plain values is refused, so a crafted file cannot run code.
"""
import argparse
import re
import sys
import time

import torch

from lecture_flash.validation import BACKENDS

from . import checkpoint
from .data import CharTokenizer, DataError, load_text
from .model import GPT, PRESETS, GPTConfig
from .train import UsageError, device_of, prog_name

SHAPE_KEYS = ("vocab_size", "block_size", "n_embd", "n_head", "n_layer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=prog_name("sample"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt.pt from lecture-flash-train, or a lecture state dict")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with mass >= p")
    p.add_argument("--stop", default=None, help="stop once this text has been generated")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, run the steps eagerly")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the per-token steps (pays off on a GPU over long samples; "
                        "compiling takes seconds, and on a CPU it ran no faster)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="attention backend")
    g = p.add_argument_group("raw lecture state dicts")
    g.add_argument("--vocab-from", help="the text the lecture model was trained on")
    g.add_argument("--n-head", type=int, default=None,
                   help="heads per block, for a state dict in this project's fused layout (the "
                        "lecture's per-head keys give it away; default: the --preset's)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="lecture",
                   help="where --n-head comes from when the state dict does not tell it")
    g.add_argument("--attn-scale", type=float, default=None,
                   help="attention scale, if the model was trained with one other than head_size**-0.5")
    for key in ("block_size", "n_embd", "n_layer"):  # read off the tensors; given, they are checked
        g.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def shape_of_state_dict(state, n_head=None):
    """GPTConfig fields of a raw GPT state dict (the lecture's or ours), read off its tensors:
    vocabulary and width from the token embedding, block size from the position embedding,
    layers from the block indices, heads from the lecture's per-head keys (our fused layout
    does not record them: n_head then)."""
    try:
        vocab_size, n_embd = state["token_embedding_table.weight"].shape
        block_size = state["position_embedding_table.weight"].shape[0]
    except (KeyError, AttributeError, ValueError):
        raise DataError("it has no token_embedding_table.weight / position_embedding_table.weight "
                        "of a GPT") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    heads = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.0\.sa\.heads\.(\d+)\.", k))}
    return dict(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd,
                n_layer=max(layers) + 1 if layers else 0, n_head=len(heads) if heads else n_head)


def load_model(args, device):
    """(model, tokenizer) from a lecture-flash-train checkpoint or a raw lecture state dict."""
    obj = checkpoint.load(args.ckpt)
    if isinstance(obj, dict) and "model" in obj and "config" in obj and "tokenizer" in obj:
        tok = CharTokenizer.from_state_dict(obj["tokenizer"])
        cfg = GPTConfig(**{**obj["config"], "backend": args.backend})
        state = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not args.vocab_from:
            raise UsageError(f"{args.ckpt} is a raw state dict: pass --vocab-from TEXTFILE "
                             "(the text it was trained on) to rebuild its tokenizer")
        try:
            shape = shape_of_state_dict(obj, args.n_head or GPTConfig.from_preset(args.preset).n_head)
        except DataError as e:
            raise DataError(f"{args.ckpt} is not a GPT state dict: {e}") from None
        for key in ("block_size", "n_embd", "n_layer"):
            given = getattr(args, key)
            if given is not None and given != shape[key]:
                raise UsageError(f"--{key.replace('_', '-')} {given} contradicts {args.ckpt} "
                                 f"({key} {shape[key]})")
        tok = CharTokenizer.from_text(load_text(args.vocab_from))
        if tok.vocab_size != shape["vocab_size"]:
            raise UsageError(f"--vocab-from has {tok.vocab_size} distinct characters, but the model "
                             f"in {args.ckpt} was trained on {shape['vocab_size']}: not its text")
        try:
            cfg = GPTConfig(backend=args.backend, attn_scale=args.attn_scale, dropout=0.0, **shape)
        except ValueError as e:
            raise UsageError(f"{args.ckpt}: {e} (pass --n-head)") from None
        state = obj
    else:
        raise DataError(f"{args.ckpt} is neither a lecture-flash-train checkpoint nor a model state dict")
    model = GPT(cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0]
        shape = ", ".join(f"{k} {getattr(cfg, k)}" for k in SHAPE_KEYS)
        raise DataError(f"{args.ckpt} does not fit a model of {shape}: {detail}") from None
    return model.to(device).eval(), tok


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.max_new_tokens < 0:
            raise UsageError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
        device = device_of(args.device)
        model, tok = load_model(args, device)
        prompt = tok.encode(args.prompt)
    except (UsageError, DataError, checkpoint.CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not prompt:
        sys.exit("error: --prompt is empty")
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    try:
        tokens = model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              seed=args.seed, cuda_graphs=False if args.no_cuda_graphs else None,
                              compile=args.compile)
        sys.stdout.write(args.prompt)
        t0, n, text = time.perf_counter(), 0, ""
        for token in tokens:
            piece = tok.decode(token[0].tolist())  # reading the token back is the only sync
            n += 1
            if args.stop:
                text += piece
                if args.stop in text:  # print up to and including the stop text, then end
                    sys.stdout.write(piece[:len(piece) - (len(text) - text.index(args.stop) - len(args.stop))])
                    break
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.exit("interrupted")
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):,.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
