"""Context parallelism (lecture_flash.context_parallel): a sequence sharded over 2 and 4 gloo
processes on CPU, its output and gradients held to the tolerance rule against single-process
attention (the float64 oracle; PyTorch's math in the inputs' dtype as the baseline)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lecture_flash import context_parallel as cp
from lecture_flash.reference import causal_attention_reference, naive_causal_attention
from lecture_flash.testing import assert_by_rule

from cp_worker import spec_inputs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")
WORKER = Path(__file__).with_name("cp_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(specs, world, out_dir):
    """Start `world` processes of cp_worker.py on the specs (one process group, each spec in
    turn: a process start costs seconds); each spec's outputs and gradients, put back in the
    sequence's order."""
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    if not any(spec.get("backend") == "triton" for spec in specs):
        env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(specs), str(out_dir)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    results = []
    for i, spec in enumerate(specs):
        parts = [torch.load(Path(out_dir) / f"{i}-{r}.pt") for r in range(world)]
        dim = 0 if "docs" in spec else 2  # packed documents: (T, heads, D)
        results.append({name: cp.unshard([p[name] for p in parts], world, dim=dim,
                                         zigzag=spec["zigzag"])
                        for name in ("out", "dq", "dk", "dv")})
        results[-1]["bases"] = [p["base"] for p in parts]  # each rank's dropout seed
    return results


def grads(fn, inputs, d):
    """[out, dq, dk, dv] of fn on inputs, gradient d."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, d)]


def ring_keep_mask(spec, world, bases, device="cpu"):
    """The (B, H, T, T) keep mask a ring's dropout drew over the whole sequence: every block's
    (block_keep_mask of its block_seed from its rank's seed, drawn on `device`) where the ring
    attended it."""
    B, H, Hk, T, D = spec["B"], spec["H"], spec["Hk"], spec["T"], spec["D"]
    sizes = cp.chunk_sizes(T, world, spec["zigzag"])
    starts = [sum(sizes[:c]) for c in range(len(sizes))]
    keep = torch.zeros(B, H, T, T, dtype=torch.bool, device=device)
    for r in range(world):
        for qc in cp.rank_chunks(r, world, spec["zigzag"]):
            for kc in range(len(sizes)):
                if sizes[qc] == 0 or sizes[kc] == 0 or (spec["causal"] and kc > qc):
                    continue
                seed = cp.block_seed(bases[r], (qc, kc), len(sizes))
                rows = slice(starts[qc], starts[qc] + sizes[qc])
                cols = slice(starts[kc], starts[kc] + sizes[kc])
                keep[:, :, rows, cols] = cp.block_keep_mask(
                    torch.empty(B, H, sizes[qc], D, device=device),
                    torch.empty(B, Hk, sizes[kc], D, device=device), spec["dropout_p"], seed)
    return keep


def single_process(spec, keep=None):
    """(float64 oracle, the inputs' dtype baseline) of the whole sequence: out, dq, dk, dv."""
    full, do, cu = spec_inputs(spec)
    T = spec["T"]
    causal, scale = spec["causal"], spec.get("scale")
    window = tuple(spec["window"]) if "window" in spec else None
    softcap = spec.get("softcap", 0.0)
    if cu is not None:  # packed documents: the oracle's packed rows
        rows = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
        return tuple(grads(lambda a, b, c: causal_attention_reference(
            a, b, c, causal=causal, scale=scale, window=window, **rows), inputs, d)
            for inputs, d in (([x.double() for x in full], do.double()), (full, do)))

    drop = dict(dropout_p=spec["dropout_p"], dropout_mask=keep) if keep is not None else {}
    ref = grads(lambda a, b, c: causal_attention_reference(a, b, c, causal=causal, scale=scale,
                                                           window=window, softcap=softcap, **drop),
                [x.double() for x in full], do.double())
    # PyTorch's math in the inputs' dtype: the reference's arithmetic without its float32.
    low = grads(lambda a, b, c: causal_attention_reference(a, b, c, causal=causal, scale=scale,
                                                           window=window, softcap=softcap)
                if softcap else naive_causal_attention(
                    a, b, c, scale, window=window, **drop,
                    mask=None if causal else torch.ones(T, T, dtype=torch.bool)), full, do)
    return ref, low


CASES = {
    "causal zigzag, 2 ranks": (dict(B=2, H=2, Hk=2, T=64, D=16, causal=True, zigzag=True), 2),
    "causal zigzag, 4 ranks, grouped heads, 45 positions": (
        dict(B=1, H=4, Hk=2, T=45, D=16, causal=True, zigzag=True), 4),
    "causal contiguous, 4 ranks, bthd": (
        dict(B=1, H=2, Hk=1, T=40, D=8, causal=True, zigzag=False, layout="bthd"), 4),
    "full attention, 2 ranks, 33 positions, scale": (
        dict(B=2, H=2, Hk=2, T=33, D=16, causal=False, zigzag=False, scale=0.3), 2),
    "full attention, 4 ranks, zigzag shards": (
        dict(B=1, H=4, Hk=4, T=48, D=8, causal=False, zigzag=True), 4),
    "bfloat16, causal, 2 ranks": (dict(B=1, H=2, Hk=2, T=32, D=16, causal=True, zigzag=True,
                                       dtype="bfloat16"), 2),
    "all-gather, causal, 4 ranks, grouped heads, 45 positions": (
        dict(B=1, H=4, Hk=2, T=45, D=16, causal=True, zigzag=True, exchange="allgather"), 4),
    "all-gather, a window of 5, 2 ranks": (dict(B=2, H=2, Hk=1, T=40, D=16, causal=True,
                                                zigzag=True, exchange="allgather", window=[5, 0]), 2),
    "all-gather, full attention, 2 ranks": (dict(B=1, H=2, Hk=2, T=33, D=16, causal=False,
                                                 zigzag=False, exchange="allgather"), 2),
    # Packed documents (cu_seqlens): shards of the stream cut across documents' boundaries; an
    # empty document and a one-token one among them.
    "all-gather, packed documents, 2 ranks": (
        dict(B=1, H=2, Hk=2, T=44, D=16, causal=True, zigzag=True, exchange="allgather",
             docs=[9, 14, 0, 1, 20]), 2),
    "all-gather, packed documents, 4 ranks, grouped heads, window of 4": (
        dict(B=1, H=4, Hk=2, T=45, D=8, causal=True, zigzag=True, exchange="allgather",
             docs=[30, 3, 12], window=[4, 0]), 4),
    "all-gather, packed documents, full attention, 2 ranks": (
        dict(B=1, H=2, Hk=1, T=27, D=8, causal=False, zigzag=False, exchange="allgather",
             docs=[5, 17, 5], scale=0.4), 2),
}


_LAUNCHED = {}


def launched(world, tmp_path_factory):
    """Every case of CASES and DROPOUT_CASES for `world` ranks, run in one launch (kept for the
    module: a launch costs seconds of process start), by case name."""
    if world not in _LAUNCHED:
        cases = {**CASES, **{"dropout, " + name: case for name, case in DROPOUT_CASES.items()}}
        names = [name for name, (_, w) in cases.items() if w == world]
        got = run_ranks([cases[name][0] for name in names], world,
                        tmp_path_factory.mktemp(f"ranks{world}"))
        _LAUNCHED[world] = dict(zip(names, got))
    return _LAUNCHED[world]


@pytest.mark.xdist_group("context_parallel")  # the launches shared by one worker
@pytest.mark.parametrize("case", list(CASES))
def test_ring_attention_equals_one_process(case, tmp_path_factory):
    spec, world = CASES[case]
    got = launched(world, tmp_path_factory)[case]
    ref, low = single_process(spec)
    assert_by_rule([got[n] for n in ("out", "dq", "dk", "dv")], ref, low)


DROPOUT_CASES = {
    "causal zigzag, 2 ranks": (dict(B=2, H=2, Hk=2, T=40, D=16, causal=True, zigzag=True,
                                    dropout_p=0.3), 2),
    "causal zigzag, 4 ranks, grouped heads, 45 positions": (
        dict(B=1, H=4, Hk=2, T=45, D=8, causal=True, zigzag=True, dropout_p=0.5), 4),
    "full attention, 2 ranks": (dict(B=1, H=2, Hk=1, T=33, D=8, causal=False, zigzag=False,
                                     dropout_p=0.2), 2),
}


@pytest.mark.xdist_group("context_parallel")  # the launches shared by one worker
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_ring_dropout_is_one_process_under_the_same_mask(case, tmp_path_factory):
    """Dropout in the ring: its output and gradients are one process's attention under the keep
    mask its blocks drew (each block's from its own seed, the backward drawing the same again),
    held to the 2x rule; and the mask drops about p of the weights."""
    spec, world = DROPOUT_CASES[case]
    got = launched(world, tmp_path_factory)["dropout, " + case]
    keep = ring_keep_mask(spec, world, got["bases"])
    seen = torch.ones(spec["T"], spec["T"], dtype=torch.bool)
    seen = seen.tril() if spec["causal"] else seen
    dropped = 1 - keep[..., seen].float().mean().item()
    assert abs(dropped - spec["dropout_p"]) < 0.08, dropped
    ref, low = single_process(spec, keep)
    assert_by_rule([got[n] for n in ("out", "dq", "dk", "dv")], ref, low)


def test_the_kernels_pieces_in_a_ring_under_the_interpreter(tmp_path, monkeypatch):
    """The Triton forward and backward as the blocks of a 2-rank ring (the interpreter), with
    and without dropout."""
    if "triton" not in __import__("lecture_flash").available_backends("cpu"):
        pytest.skip("triton cannot run here (no interpreter)")
    spec = dict(B=1, H=2, Hk=1, T=40, D=16, causal=True, zigzag=True, backend="triton")
    dropped = dict(spec, dropout_p=0.3)  # the kernels' own dropout draws, forward and backward
    got, got_dropped = run_ranks([spec, dropped], 2, tmp_path)
    ref, low = single_process(spec)
    assert_by_rule([got[n] for n in ("out", "dq", "dk", "dv")], ref, low)
    monkeypatch.setattr(cp, "BACKEND", "triton")  # the blocks' masks as the kernels drew them
    ref, low = single_process(dropped, ring_keep_mask(dropped, 2, got_dropped["bases"]))
    assert_by_rule([got_dropped[n] for n in ("out", "dq", "dk", "dv")], ref, low)


def test_all_gather_variant_takes_softcap_and_dropout(tmp_path):
    """Softcapping held to the rule (float32 both ways: the rule's baseline is the reference's
    arithmetic); dropout runs, each rank drawing its own mask: p = 0.5 changes the output, and
    its gradients are finite."""
    spec = dict(B=1, H=2, Hk=2, T=24, D=8, causal=True, zigzag=True, exchange="allgather",
                softcap=1.5)
    got, dropped, plain = run_ranks([spec, dict(spec, softcap=0.0, dropout_p=0.5),
                                     dict(spec, softcap=0.0)], 2, tmp_path)
    ref, low = single_process(spec)
    assert_by_rule([got[n] for n in ("out", "dq", "dk", "dv")], ref, low)
    assert not torch.allclose(dropped["out"], plain["out"])
    assert all(torch.isfinite(dropped[n]).all() for n in ("out", "dq", "dk", "dv"))


def test_shard_and_unshard_are_inverse_for_any_length():
    x = torch.arange(2 * 3 * 37 * 2.0).view(2, 3, 37, 2)
    for world in (1, 2, 3, 4):
        for zigzag in (True, False):
            parts = [cp.shard(x, r, world, zigzag=zigzag) for r in range(world)]
            assert sum(p.shape[2] for p in parts) == 37
            assert torch.equal(cp.unshard(parts, world, zigzag=zigzag), x)
    assert cp.rank_chunks(1, 4) == (1, 6)  # rank i holds chunks i and 2W - 1 - i


def test_the_stateless_pieces_merge_to_whole_attention():
    """attention_block over two key halves, merged, is attention over all of them; the
    backward of each half, accumulated, is the whole backward."""
    torch.manual_seed(3)
    q = torch.randn(1, 4, 8, 16, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float64) for _ in range(2))
    scale = 0.25
    o1, l1 = cp.attention_block(q, k[:, :, :12], v[:, :, :12], False, scale)
    o2, l2 = cp.attention_block(q, k[:, :, 12:], v[:, :, 12:], True, scale)
    out, lse = cp.merge(*cp.merge(None, None, o1, l1), o2, l2)
    want, want_lse = causal_attention_reference(q, k, v, scale=scale, return_lse=True)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=0)
    do = torch.randn_like(q)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for keys, causal in ((slice(0, 12), False), (slice(12, 20), True)):
        part_k, part_v = torch.zeros_like(k[:, :, keys]), torch.zeros_like(v[:, :, keys])
        cp.attention_block_backward(do, q, k[:, :, keys], v[:, :, keys], out, lse, causal,
                                    scale, dq, part_k, part_v)
        dk[:, :, keys] += part_k
        dv[:, :, keys] += part_v
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    wants = torch.autograd.grad(causal_attention_reference(qq, kk, vv, scale=scale), (qq, kk, vv), do)
    for g, w in zip((dq, dk, dv), wants):
        torch.testing.assert_close(g.double(), w, atol=1e-6, rtol=0)


def test_what_the_ring_does_not_implement_is_refused_by_name():
    q = torch.randn(1, 1, 4, 8)
    for name, value in (("window", (2, 0)), ("softcap", 5.0)):
        with pytest.raises(NotImplementedError, match=f"{name} is not implemented by the ring"):
            cp.ring_attention(q, q, q, **{name: value})
    with pytest.raises(NotImplementedError, match="sinks"):
        cp.ring_attention(q, q, q, sinks=torch.zeros(1), exchange="allgather")
    with pytest.raises(ValueError, match="exchange must be"):
        cp.ring_attention(q, q, q, exchange="tree")
    packed, cu = torch.randn(6, 2, 8), torch.tensor([0, 2, 6])
    with pytest.raises(NotImplementedError, match="packed documents .cu_seqlens. are not implemented by the ring"):
        cp.ring_attention(packed, packed, packed, cu_seqlens=cu)
    with pytest.raises(ValueError, match="one layout"):
        cp.ring_attention(packed, packed, packed, cu_seqlens=cu, exchange="allgather", layout="bthd")
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.ring_attention(q, q, q)


@pytest.mark.gpu
def test_a_single_rank_ring_on_the_gpu(device, tmp_path):
    """One GPU: a one-rank NCCL ring (its zigzag chunks attend each other through the Triton
    pieces: causal diagonal blocks, a full block) against single-process attention under the
    rule, forward and backward. (Its CPU twins: the gloo runs above.)"""
    import torch.distributed as dist
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, 250, 64, generator=g).to(device, torch.bfloat16)
                   for h in (4, 2, 2))
        do = torch.randn(q.shape, generator=g).to(device, torch.bfloat16)

        got = grads(lambda a, b, c: cp.ring_attention(a, b, c), (q, k, v), do)
        ref = grads(lambda a, b, c: causal_attention_reference(a, b, c),
                    [x.double() for x in (q, k, v)], do.double())
        low = grads(lambda a, b, c: naive_causal_attention(a, b, c), (q, k, v), do)
        assert_by_rule(got, ref, low)
        # Dropout: the kernels' draws, forward and backward, as the blocks' masks say.
        torch.manual_seed(1)
        base = cp.draw_base_seed()
        torch.manual_seed(1)
        got = grads(lambda a, b, c: cp.ring_attention(a, b, c, dropout_p=0.2), (q, k, v), do)
        spec = dict(B=2, H=4, Hk=2, T=250, D=64, causal=True, zigzag=True, dropout_p=0.2)
        keep = ring_keep_mask(spec, 1, [base], device).to(device)
        ref = grads(lambda a, b, c: causal_attention_reference(a, b, c, dropout_p=0.2,
                                                               dropout_mask=keep),
                    [x.double() for x in (q, k, v)], do.double())
        low = grads(lambda a, b, c: naive_causal_attention(a, b, c, dropout_p=0.2,
                                                           dropout_mask=keep), (q, k, v), do)
        assert_by_rule(got, ref, low)
    finally:
        dist.destroy_process_group()
