"""One training step (forward, backward, optimizer step) as gpt.train runs it: eagerly, or on
CUDA captured once in a CUDA graph and replayed, so that a step costs one launch of the host's
time instead of hundreds (the lecture's 10.8M-parameter model is bound by launches, not by the
GPU).

Captured, the step works on static tensors: the batch is copied into fixed input buffers, the
gradients are zeroed inside the graph (kept allocated, never set to None), the optimizer is
AdamW with capturable=True (its step count and learning rate live on the device: the schedule
writes the lr tensor before each replay), and the loss comes back in a fixed device tensor that
nothing reads unless asked (no host sync per step). Random draws inside the graph (dropout,
the attention kernel's dropout seed) come from PyTorch's graph-safe generator: each replay
draws anew. Captured, the capture-and-replay part, also runs gpt/generate.py's decode steps.
"""
import contextlib

import torch

# Eager steps run before the capture, on a side stream, as PyTorch's CUDA-graph notes ask (lazy
# initialisation, cuBLAS workspaces, the Triton kernels' autotuning and launch plans). They are
# real training steps, counted as such. Under DistributedDataParallel the notes ask for 11 (DDP
# settles its gradient buckets over the first iterations).
WARMUP_STEPS = 3
DDP_WARMUP_STEPS = 11


def adamw(params, device, graphs, **options):
    """AdamW, fused: one kernel for all parameters instead of a dozen ops for each (on the
    2-core CPU that is a fifth of the small preset's training step). For a captured step
    (graphs, CUDA) also capturable, its lr a device tensor."""
    if graphs:
        options.update(capturable=True)
    return torch.optim.AdamW(params, fused=True, **{**options, "lr": adamw_lr(options["lr"], device, graphs)})


def adamw_lr(value, device, graphs):
    """The lr as AdamW holds it: a float, or for a captured step a device tensor (the schedule
    writes it before each replay, set_lr)."""
    return torch.tensor(float(value), device=device) if graphs else float(value)


def autocast(device, dtype, graphs):
    """A factory of the context a step runs its forward in: torch.autocast to dtype (None:
    float32, no autocast). A captured step must not keep autocast's cache of cast weights
    between replays, so with graphs the cache is off."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=not graphs)


def set_lr(optimizer, lr):
    """Write lr into every param group, in place where it is a device tensor (a captured graph
    reads that tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class Captured:
    """fn(*args) as a CUDA graph, replayed.

    The first `warmup` calls run eagerly on a side stream (real calls: their results are
    returned); the next one copies its args into static buffers and is captured, and it and
    every later call copy their args into those buffers and replay. A replay's result is the
    graph's own output, overwritten by the next replay. generators: the torch.Generators fn
    draws from besides the default one, registered with the graph so that each replay draws
    anew from them, as an eager call would.
    """

    def __init__(self, fn, generators=(), warmup=WARMUP_STEPS):
        self.fn, self.warmup = fn, warmup
        # The default CUDA generator is the graph's own already; others are registered.
        self.generators = [g for g in generators if g is not None
                           and all(g is not d for d in torch.cuda.default_generators)]
        self.done = 0
        self.graph = self.static = self.out = None

    def __call__(self, *args):
        if self.graph is None and self.done < self.warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            self.done += 1
            return out
        if self.graph is None:
            self.static = [a.clone() for a in args]
            self.graph = torch.cuda.CUDAGraph()
            for g in self.generators:
                self.graph.register_generator_state(g)
            with torch.cuda.graph(self.graph):
                self.out = self.fn(*self.static)
        else:
            for dst, src in zip(self.static, args):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.done += 1
        return self.out


class TrainStep:
    """step(x, y) -> the loss (a device tensor): zero the gradients, forward under autocast,
    backward, optimizer step. With graphs (CUDA only), the step is Captured: its first `warmup`
    run eagerly, then it is one graph replay."""

    def __init__(self, model, optimizer, autocast, graphs=False, warmup=WARMUP_STEPS):
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        # Captured, gradients are zeroed in place (the graph keeps their buffers).
        self.captured = Captured(lambda x, y: self._step(x, y, set_to_none=False),
                                 warmup=warmup) if graphs else None

    def _step(self, x, y, set_to_none):
        self.optimizer.zero_grad(set_to_none=set_to_none)
        with self.autocast():
            _, loss = self.model(x, y)
        loss.backward()
        self.optimizer.step()
        return loss

    def __call__(self, x, y):
        if self.captured is None:
            return self._step(x, y, set_to_none=True)
        return self.captured(x, y)
