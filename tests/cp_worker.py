"""One rank of tests/test_context_parallel.py's runs (started by it with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): for each spec, ring_attention of a seeded sequence's shard, forward
and backward; saves this rank's output and gradients for the test to put together."""
import json
import os
import sys

import torch
import torch.distributed as dist

from lecture_flash import context_parallel as cp


def spec_inputs(spec):
    """The whole sequence's seeded q, k, v and output gradient of a spec: (B, heads, T, D), or
    for packed documents (T, heads, D); and the documents' boundaries (None without)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hk, T, D = spec["B"], spec["H"], spec["Hk"], spec["T"], spec["D"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    shape = (lambda h: (T, h, D)) if "docs" in spec else (lambda h: (B, h, T, D))
    full = [torch.randn(*shape(h), generator=g).to(dtype) for h in (H, Hk, Hk)]
    do = torch.randn(*shape(H), generator=g).to(dtype)
    cu = (torch.tensor([0, *torch.tensor(spec["docs"]).cumsum(0).tolist()], dtype=torch.int32)
          if "docs" in spec else None)
    return full, do, cu


def run(spec, rank, world, out_path):
    cp.BACKEND = spec.get("backend", "auto")
    full, do, cu = spec_inputs(spec)
    zigzag, dim = spec["zigzag"], 0 if "docs" in spec else 2
    q, k, v = (cp.shard(x, rank, world, dim=dim, zigzag=zigzag).requires_grad_() for x in full)
    layout = spec.get("layout", "bhtd")
    args = [x.transpose(1, 2) if layout == "bthd" else x for x in (q, k, v)]
    options = {k: spec[k] for k in ("exchange", "softcap", "dropout_p") if k in spec}
    if "window" in spec:
        options["window"] = tuple(spec["window"])
    if cu is not None:  # packed documents: the whole stream's boundaries
        options["cu_seqlens"] = cu
    torch.manual_seed(rank)  # (dropout: each rank its own draws)
    base = cp.draw_base_seed()  # the ring's dropout seed, as the call below draws it
    torch.manual_seed(rank)
    out = cp.ring_attention(*args, causal=spec["causal"], zigzag=zigzag, layout=layout,
                            scale=spec.get("scale"), **options)
    if layout == "bthd":
        out = out.transpose(1, 2)
    out.backward(cp.shard(do, rank, world, dim=dim, zigzag=zigzag))
    torch.save({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "base": base},
               out_path)


def main(specs_json, out_dir):
    """Every spec of the JSON list in turn, in one process group: out_dir/{i}-{rank}.pt."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for i, spec in enumerate(json.loads(specs_json)):
        run(spec, rank, world, os.path.join(out_dir, f"{i}-{rank}.pt"))
    dist.barrier()  # every rank's results are on disk
    # Exit without tearing gloo down: under pytest's load a rank now and then aborted in the
    # teardown ("terminate called without an active exception", after its results were
    # written; never in 46 runs outside pytest), which would fail a test of nothing it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
