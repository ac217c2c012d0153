"""backend="auto" on a GPU: for each class of calls, the fastest of the Triton kernel and
PyTorch's SDPA, measured once per process when the class is first met.

A class is what decides which is faster: device, dtype, head dim, query heads per key/value
head, batch x heads, the query and key counts (each rounded up to a power of two), whether Tq == Tk, dropout on or off, and
whether the call needs gradients (then forward+backward is timed, else the forward). The
candidates are the paths causal_attention can run (masked-position guard included): the
Triton kernel, SDPA as PyTorch dispatches it, and SDPA pinned to each of its fused backends
(flash, cuDNN, memory-efficient), which another GPU or dtype may rank differently. Each runs on
the call's own inputs (the backward on detached views; the random-number state is restored
afterwards), back to back as a training loop issues them, so the host's time per call counts
as it does in use. A candidate that cannot run these inputs is left out; the earlier candidate
wins a tie. The first call of a class pays the timing (a few tens of milliseconds); later calls
are a dictionary lookup.

Where nothing can be timed (torch.compile tracing, CUDA graph capture) a class keeps the choice
measured for it earlier, else Triton. causal_attention does not measure, and keeps Triton, for
calls that name deterministic or fp32_precision (options of the Triton kernel) and under
torch.use_deterministic_algorithms(True) (SDPA's fused backward passes add dQ in no fixed
order); LECTURE_FLASH_AUTO_MEASURE=0 turns measuring off (Triton wherever it can run).
"""
import os
import statistics
import time
import warnings

import torch

MEASURE = os.environ.get("LECTURE_FLASH_AUTO_MEASURE", "1") != "0"

# Candidate routes, in the order that breaks ties: name -> the SDPA backend it pins (None: none).
ROUTES = {"triton": None, "sdpa": None, "sdpa-flash": "FLASH_ATTENTION",
          "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION"}
KEY_NAMES = ("device", "dtype", "D", "group", "BH_BUCKET", "TQ_BUCKET", "TK_BUCKET", "square",
             "dropout", "backward")


def _bucket(n):
    return 1 << max(0, n - 1).bit_length()  # the next power of two


def class_of(q, k, dropout_p, needs_grad):
    """The class of a validated (B, H, Tq, D) call: see the module docstring."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    return (str(q.device), str(q.dtype).replace("torch.", ""), D, H // k.shape[1], _bucket(B * H),
            _bucket(Tq), _bucket(Tk), Tq == Tk, dropout_p > 0, needs_grad)


def can_measure(q):
    """Whether timing can run now: real CUDA tensors, outside compilation and graph capture."""
    return (MEASURE and q.device.type == "cuda" and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def wall_ms(fn, budget_ms=30.0, repeats=5):
    """Median milliseconds per call of fn() issued back to back, synchronising after each batch
    of calls: the host's time per call counts wherever it exceeds the GPU's, as in training."""
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, min(200, int(budget_ms / 1e3 / repeats / once)))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call) * 1e3


def one_pass(attend, q, k, v, needs_grad):
    """A callable running what the call will run: attend(q, k, v) under no_grad, or forward and
    backward through detached views of q, k, v (their .grad untouched)."""
    if not needs_grad:
        def forward():
            with torch.no_grad():
                attend(q, k, v)
        return forward
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def forward_backward():
        with torch.enable_grad():
            torch.autograd.grad(attend(*leaves), leaves, do)
    return forward_backward


class Chooser:
    """class -> the route chosen for it, once per process; timer(fn) -> milliseconds."""

    def __init__(self, timer=wall_ms):
        self.timer = timer
        self.chosen, self.timed, self.left_out = {}, {}, {}

    def choose(self, cls, passes, devices=()):
        """The fastest route of passes (route -> callable running one pass), timed now if the
        class was not met before. Routes that raise RuntimeError or ValueError on a first run
        are left out; the random-number state of `devices` (and the CPU) is restored after."""
        if cls in self.chosen:
            return self.chosen[cls]
        runnable, left_out = {}, {}
        with torch.random.fork_rng(devices=list(devices)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns why a pinned backend cannot run
            for route, fn in passes.items():
                try:
                    fn()
                    runnable[route] = fn
                except (RuntimeError, ValueError) as e:
                    left_out[route] = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            if not runnable:
                raise RuntimeError(f"no attention path could run this call: {left_out}")
            timed = {route: self.timer(fn) for route, fn in runnable.items()}
        best = min(timed, key=timed.get)  # min keeps the first of equal values: the tie order
        self.chosen[cls], self.timed[cls], self.left_out[cls] = best, timed, left_out
        return best

    def report(self):
        """One dict per class met: the class's parts, the route chosen, each route's median ms,
        and why any route was left out."""
        return [{**dict(zip(KEY_NAMES, cls)), "chosen": route,
                 "timed_ms": {r: round(ms, 5) for r, ms in self.timed[cls].items()},
                 "left_out": self.left_out[cls]} for cls, route in self.chosen.items()]


CHOOSER = Chooser()


def report():
    """What auto chose in this process, per class (bench/run.py puts it in its report)."""
    return CHOOSER.report()
