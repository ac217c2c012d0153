"""Host time per call of the Triton backend: the Python between causal_attention and the GPU.

    TRITON_INTERPRET=1 python bench/host_overhead.py     # on a CPU: the Python path only
    python bench/host_overhead.py                        # on a GPU: also real launches vs SDPA

At the lecture's shapes the kernels take tens of microseconds, so what the host does per call
decides the speed. Two measurements:

- "stubbed": every kernel launch replaced by a no-op, so only Python runs (validation, dispatch,
  autograd bookkeeping, allocation, config lookup). Runs anywhere. Paths compared: the public
  causal_attention; the eager path it takes (flash_attention: an autograd.Function, or no
  autograd at all under no_grad); and the torch custom op called directly (what
  torch.compile traces, and what eager calls went through before).
- "launched" (CUDA only): real kernels on a tiny problem (1 x 1 x 16 x 64 bf16), calls issued
  back to back with one synchronise at the end, so the time per call is the host's; SDPA's
  flash and cuDNN backends beside it.
- "cpu" (on a CPU): PyTorch's SDPA on the same (float32) call, its dispatch and a few
  multiplies: the host time ours is held to there.

Each figure is the median over --repeats rounds of the mean of --calls back-to-back calls, after
a warm-up; each round times every path once, so that the machine's state weighs on all alike.
"""
import argparse
import contextlib
import sys

# Python puts bench/ on sys.path, never the repository root (whose kernels/ would shadow Hugging
# Face's `kernels`): lecture_flash comes from its install (pip install -e .).
from harness import timed_calls  # noqa: E402  (first: it says how to install lecture_flash if missing)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lecture_flash import causal_attention, default_device, flash, flash_launch  # noqa: E402


@contextlib.contextmanager
def launches_stubbed():
    """Every kernel launch in lecture_flash.flash_launch becomes a no-op (outputs stay uninitialised): a
    launch plan's first call gets a stand-in config and no compiled kernel, every later call of
    a plan does nothing, and the atomic path's preprocessing does nothing."""
    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    launch = flash_launch
    saved = launch._launch, launch._Plan.__call__, launch._bwd_preprocess
    launch._launch = lambda name, tiles_along, args, meta, reset=None: [launch._INTERPRET_CONFIG, (1, 1, 1), None]
    launch._Plan.__call__ = lambda self, tensors: None
    launch._bwd_preprocess = NoLaunch()
    try:
        yield
    finally:
        launch._launch, launch._Plan.__call__, launch._bwd_preprocess = saved


def passes(attend, q, k, v, do):
    """(forward under no_grad, forward+backward) of attend(q, k, v), as callables."""
    qd, kd, vd = (t.detach() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            attend(qd, kd, vd)

    def fwd_bwd():
        torch.autograd.grad(attend(q, k, v), (q, k, v), do)

    return fwd, fwd_bwd


def ours(scale):
    """The Triton backend's paths, name -> attend(q, k, v)."""
    return {
        "causal_attention": lambda a, b, c: causal_attention(a, b, c, backend="triton"),
        "eager path": lambda a, b, c: flash.flash_attention(a, b, c, scale),
        "custom op": lambda a, b, c: flash._fwd_op(a, b, c, None, scale, 0.0, "ieee", True, -1, *flash.DENSE_OP_ROWS)[0],
    }


def sdpa():
    """SDPA's flash and cuDNN backends, name -> attend(q, k, v)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pinned(backend):
        def attend(a, b, c):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True)
        return attend

    return {"sdpa flash": pinned(SDPBackend.FLASH_ATTENTION),
            "sdpa cudnn": pinned(SDPBackend.CUDNN_ATTENTION)}


def measure(label, named, tensors, calls, repeats, device):
    """One row per path: {"launches", "path", "fwd_us", "fwd_bwd_us"} (None where it cannot run,
    with "note" saying why): the median over `repeats` rounds of the mean microseconds per call
    of `calls` back-to-back calls (one synchronisation at the end of each batch), every path's
    batch once per round (harness.timed_calls, wall clock), so that the machine's state (a CPU's
    thread wake-ups, its clock) weighs on every path alike."""
    fns = {(name, key): fn for name, attend in named.items()
           for key, fn in zip(("fwd_us", "fwd_bwd_us"), passes(attend, *tensors))}
    found = timed_calls(fns, device, inner=calls, min_time=0.0, max_reps=repeats,
                        min_reps=repeats, wall=True)
    rows = []
    for name in named:
        row = {"launches": label, "path": name}
        for key in ("fwd_us", "fwd_bwd_us"):
            got = found[(name, key)]
            if isinstance(got, str):  # e.g. no cuDNN attention for this GPU or build
                row[key], row["note"] = None, got
            else:
                row[key] = round(got[0] * 1e3, 2)
        rows.append(row)
    return rows


def host_rows(device, calls=500, repeats=7):
    """Host microseconds per call on the smallest input, (1, 1, 16, 64): ours with launches
    stubbed (Python only: runs anywhere the Triton backend can be called, a CPU under the
    interpreter); on CUDA also real launches, ours and SDPA's flash and cuDNN backends; on a
    CPU, PyTorch's SDPA for the same call (its dispatch plus a few multiplies). Returns
    (rows, shape, dtype name)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 64, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    tensors = (q, k, v, torch.randn_like(q))
    scale = q.shape[-1] ** -0.5
    rows = []
    # On a CPU, PyTorch's SDPA is timed in the same rounds as ours stubbed (it launches nothing
    # of ours), so that both meet the machine in the same state.
    plain = {} if device.type == "cuda" else {
        "sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)}
    if device.type == "cuda" or flash.INTERPRET:
        with launches_stubbed():
            rows += measure("stubbed", {**ours(scale), **plain}, tensors, calls, repeats, device)
    elif plain:
        rows += measure("cpu", plain, tensors, calls, repeats, device)
    for row in rows:
        if row["path"] in plain:
            row["launches"] = "cpu"
    if device.type == "cuda":
        rows += measure("launched", {**ours(scale), **sdpa()}, tensors, calls, repeats, device)
    return rows, (1, 1, 16, 64), str(dtype).replace("torch.", "")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=500, help="calls per timed run (default 500)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is shown (default 7)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        p.error("--calls and --repeats must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    if device.type == "cpu" and not flash.INTERPRET:
        sys.exit("no GPU: run with TRITON_INTERPRET=1 (set before Python starts) for the stubbed figures")
    rows, shape, dtype = host_rows(device, args.calls, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}, torch {torch.__version__}, shape {shape} {dtype}; microseconds per call, "
          f"median of {args.repeats} x {args.calls}")
    header = ["launches", "path", "fwd (no_grad)", "fwd+bwd"]
    table = [[r["launches"], r["path"], *(f"{r[key]:.1f}" if r[key] is not None else
                                          f"n/a ({r.get('note', '')[:40]})"
                                          for key in ("fwd_us", "fwd_bwd_us"))] for r in rows]
    widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header))]
    for row in [header] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
