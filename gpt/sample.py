"""Sample from a trained GPT: python -m gpt.sample --ckpt PATH [--prompt TEXT] ...

PATH is a checkpoint written by gpt.train, or a raw state dict saved by the lecture's gpt.py
(torch.save(model.state_dict(), ...)); for the latter, pass --vocab-from with the text it was
trained on (to rebuild its tokenizer) and the model shape (--preset or the size flags).
"""
import argparse
import sys
import time

import torch

from kernels import default_device

from .data import CharTokenizer, DataError, load_text
from .model import GPT, PRESETS, GPTConfig
from .train import MODEL_KEYS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt.pt from gpt.train, or a lecture state dict")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with mass >= p")
    p.add_argument("--stop", default=None, help="stop once this text has been generated")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, run the steps eagerly")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto")
    g = p.add_argument_group("raw lecture state dicts")
    g.add_argument("--vocab-from", help="the text the lecture model was trained on")
    g.add_argument("--preset", choices=sorted(PRESETS), default="lecture")
    g.add_argument("--attn-scale", type=float, default=None,
                   help="attention scale, if the model was trained with one other than head_size**-0.5")
    for key in MODEL_KEYS:
        p.add_argument("--" + key.replace("_", "-"), type=float if key == "dropout" else int, default=None)
    return p.parse_args(argv)


def load_model(args, device):
    """(model, tokenizer) from a gpt.train checkpoint or a raw lecture state dict."""
    try:
        obj = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DataError(f"checkpoint {args.ckpt} does not exist") from None
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        tok = CharTokenizer.from_state_dict(obj["tokenizer"])
        cfg = GPTConfig(**{**obj["config"], "backend": args.backend})
        state = obj["model"]
    else:
        if not args.vocab_from:
            raise DataError(f"{args.ckpt} is a raw state dict: pass --vocab-from TEXTFILE "
                            "(the text it was trained on) and the model shape")
        tok = CharTokenizer.from_text(load_text(args.vocab_from))
        given = {k: getattr(args, k) for k in MODEL_KEYS if getattr(args, k) is not None}
        cfg = GPTConfig.from_preset(args.preset, vocab_size=tok.vocab_size, backend=args.backend,
                                    attn_scale=args.attn_scale, **given)
        state = obj
    model = GPT(cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{args.ckpt} does not fit the model shape {cfg}: {first}") from None
    return model.to(device).eval(), tok


def main(argv=None):
    args = parse_args(argv)
    device = default_device(args.device)
    try:
        model, tok = load_model(args, device)
        prompt = tok.encode(args.prompt)
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not prompt:
        sys.exit("error: --prompt is empty")
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    try:
        tokens = model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              seed=args.seed, cuda_graphs=False if args.no_cuda_graphs else None)
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
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):,.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
