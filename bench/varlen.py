"""The varlen section: packed documents of mixed lengths (causal within each, none across),
forward and forward+backward, as training on packed documents runs it.

IMPLS is the registry: name -> factory(device, quick) that returns attend(q, k, v, docs) (q of
(total, H, D), k and v of (total, Hk, D); docs a Docs of the packing) or a string saying why it
cannot run here. Each is checked against the oracle (kernels/testing.py's rule) before it is
timed. The alternatives are what a user without varlen attention would write: pad the
documents into a batch for SDPA, mask SDPA block-diagonally, or a FlexAttention document mask.
"""
from collections import namedtuple

import torch
import torch.nn.functional as F

from lecture_flash import available_backends, causal_attention
from lecture_flash.packing import pad, unpad
from lecture_flash.reference import causal_attention_reference, naive_packed_attention
from lecture_flash.testing import rule_failures

import attention
from attention import _geomean, _gqa, flex
from harness import (begin_table, built, print_never_ran, progress, row_groups, pass_fn,
                     time_point, timed_groups, timing_cells)

# Document lengths summing to 16384 tokens (the GPU point), from 480 to 4096 of them.
DOC_LENGTHS = (4096, 2048, 3000, 1000, 3584, 512, 1024, 640, 480)

Docs = namedtuple("Docs", ["cu", "longest", "lengths"])


def docs_of(lengths, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    return Docs(cu, max(lengths), lengths)


def _ours(backend):
    def factory(device, quick):
        if backend == "triton" and ("triton" not in available_backends(device) or device.type != "cuda"):
            return "needs a CUDA GPU and triton"
        return lambda q, k, v, docs: causal_attention(
            q, k, v, backend=backend, cu_seqlens_q=docs.cu, cu_seqlens_k=docs.cu,
            max_seqlen_q=docs.longest, max_seqlen_k=docs.longest)
    return factory


def _sdpa_padded(device, quick):
    """Every document right-padded to the longest, one batch row each, SDPA's causal kernel (the
    padding rows computed and thrown away), packed again."""
    def attend(q, k, v, docs):
        padded = [pad(x, docs.cu, docs.longest) for x in (q, k, v)]  # (docs, heads, longest, D)
        out = F.scaled_dot_product_attention(*padded, is_causal=True, **_gqa(*padded[:2]))
        return unpad(out, docs.cu, q.shape[0])
    return attend


def _sdpa_masked(device, quick):
    """One sequence of every token, SDPA with a block-diagonal causal boolean mask."""
    masks = {}

    def attend(q, k, v, docs):
        if docs.lengths not in masks:
            doc = _document_ids(docs, q.device)
            masks.clear()
            masks[docs.lengths] = (doc[:, None] == doc[None, :]).tril()
        seq = [x.transpose(0, 1)[None] for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*seq, attn_mask=masks[docs.lengths], **_gqa(*seq[:2]))
        return out[0].transpose(0, 1)
    return attend


def _flex(device, quick):
    run = flex(device, quick)
    if isinstance(run, str):
        return run

    def document_causal(docs, device):
        doc = _document_ids(docs, device)
        return lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def attend(q, k, v, docs):
        seq = [x.transpose(0, 1)[None] for x in (q, k, v)]  # one sequence of every token
        return run(*seq, docs.lengths, lambda: document_causal(docs, q.device))[0].transpose(0, 1)
    return attend


def _document_ids(docs, device):
    """(total,) the document of each packed token."""
    return torch.repeat_interleave(torch.arange(len(docs.lengths), device=device),
                                   torch.tensor(docs.lengths, device=device))


IMPLS = {
    "sdpa-padded": _sdpa_padded,
    "sdpa-masked": _sdpa_masked,
    "flex-document": _flex,
    "triton": _ours("triton"),
    "project-auto": _ours("auto"),
}


def points(device, dtypes, quick):
    """(dtype, H, Hk, D, document lengths): 16k tokens on a GPU, a sixteenth of that on a CPU."""
    if device.type == "cuda":
        return [(dt, H, Hk, D, DOC_LENGTHS) for dt in dtypes
                for H, Hk, D in ((16, 16, 128), (32, 8, 128))]
    lengths = tuple(max(1, n // (64 if quick else 16)) for n in DOC_LENGTHS)
    return [(dt, 6, 6, 64, lengths) for dt in dtypes]


def _check(impl, q, k, v, docs):
    """None if impl's output obeys the tests' tolerance rule against the oracle (the baseline:
    PyTorch's math attention in the inputs' dtype, padded and masked), else why."""
    rows = dict(cu_seqlens_q=docs.cu, cu_seqlens_k=docs.cu)
    with torch.no_grad():
        out = impl(q, k, v, docs)
        ref = causal_attention_reference(q.double(), k.double(), v.double(), **rows)
        low = naive_packed_attention(q, k, v, docs.cu, docs.cu)
    failures = rule_failures([out], [ref], [low], names=("out",))
    return f"wrong: {failures[0]}" if failures else None


def run(opts, rows, save):
    device = opts.device
    impls = built(IMPLS, opts)
    grid = getattr(opts, "points", None) or points(device, opts.dtypes, opts.quick)
    bar = progress(len(grid) * len(impls), "varlen")
    for dtype, H, Hk, D, lengths in grid:
        torch.manual_seed(0)
        docs = docs_of(lengths, device)
        total = sum(lengths)
        sets = [[torch.randn(total, heads, D, device=device, dtype=dtype, requires_grad=True)
                 for heads in (H, Hk, Hk)] for _ in range(2)]
        plain = [[t.detach() for t in qkv] for qkv in sets]
        do = torch.randn(total, H, D, device=device, dtype=dtype)
        flops = sum(4 * H * n * n * D / 2 for n in lengths)  # causal within each document
        base = dict(dtype=str(dtype).replace("torch.", ""), H=H, D=D, tokens=total,
                    docs=len(lengths), **({"Hk": Hk} if Hk != H else {}))
        time_point(impls, base, lambda impl: _check(impl, *plain[0], docs),
                   lambda impl, p: pass_fn(impl, p, plain, sets, do, docs), flops, rows,
                   f"varlen {base['dtype']} H={H}/{Hk} tokens={total}", bar, device)
        sets = plain = do = None  # freed before the next point's inputs
        save()
    bar.close()


def print_table(rows, opts):
    cuda = opts.device.type == "cuda"
    absent = begin_table(rows, "varlen (packed documents, causal within each" +
                         ("; TFLOP/s count each document's causal FLOPs" if cuda else "") + ")")
    if absent is None:
        return
    flops = f" {'TFLOP/s':>8}" if cuda else ""
    print(f"{'dtype':9} {'pass':8} {'H':>5} {'D':>4} {'tokens':>7} {'docs':>4}  {'impl':14} "
          f"{'ms':>9}{flops} {'vs best alternative':>19}  note")
    for rs in row_groups(rows, ("dtype", "pass", "H", "Hk", "D", "tokens"), absent):
        others = [r["ms"] for r in rs if r["impl"] not in ("triton", "project-auto") and "ms" in r]
        best = min(others) if others else None
        for r in rs:
            heads, ms, tf, vs = timing_cells(r, best, cuda)
            print(f"{r['dtype']:9} {r['pass']:8} {heads:>5} {r['D']:>4} {r['tokens']:>7} "
                  f"{r['docs']:>4}  {r['impl']:14} {ms}{tf} {vs:>19}  {r.get('skipped', '')}")
        print()
    print_never_ran(rows)


def verdict(rows, opts):
    """Per pass: ours against the fastest alternative, geometric mean over the points."""
    ours, lines = attention._ours(opts.device.type), []
    for p in ("fwd", "fwd+bwd"):
        ratios = [min(v for k, v in ms.items() if k not in ("triton", "project-auto")) / ms[ours]
                  for ms in timed_groups(rows, p, ("dtype", "H", "Hk", "D", "tokens"))
                  if ours in ms and any(k not in ("triton", "project-auto") for k in ms)]
        if ratios:
            lines.append(f"varlen {p}: {ours} {_geomean(ratios):.2f}x the fastest alternative "
                         f"(padded or masked SDPA, FlexAttention; geometric mean over {len(ratios)} "
                         f"points; worst {min(ratios):.2f}x)")
    return lines
