"""Choosing a kernel config once per specialisation, and remembering the choice.

A specialisation is whatever really changes the best config (for flash.py: kernel, dtype, device,
head dim, sequence-length buckets, dropout, precision, determinism). Its first launch either
times every candidate config and keeps the fastest (autotuning on), or runs the first candidate
that this GPU can hold (off). Every later launch of it is a dictionary lookup and the kernel
call: no per-call bookkeeping over the kernel's arguments, as triton.autotune does (22.6 us a
launch for our kernels' argument lists, Triton 3.9 on a 2-core CPU, against 1.6 us for the
lookup).

    cache = ConfigCache(autotune=True)
    cache.run(key, candidates, run)     # run(config) launches the kernel with that config
    cache.report()                      # what was chosen, and what each candidate timed

The timer is a constructor argument, so tests pass a fake one and need no GPU.
"""
import torch
import triton

try:
    from triton.errors import TritonError
except ImportError:  # Triton < 3.4
    from triton.compiler.errors import TritonError

# A config the GPU cannot hold (more shared memory than it has, registers ptxas cannot
# allocate) fails when it is loaded, before anything runs; one Triton cannot build for this
# architecture fails to compile (a TritonError, or a RuntimeError from an MLIR pass). Either
# way the next config is tried.
CANNOT_RUN = (TritonError, RuntimeError)


def median_ms(fn):
    """Median milliseconds of fn() on the GPU. Shorter than do_bench's defaults (25 ms warm-up,
    100 ms of repetitions): enough to rank a few configs."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def first_that_loads(configs, run):
    """run(conf) for each config in turn until one loads on this GPU; the config that did."""
    for conf in configs[:-1]:
        try:
            run(conf)
            return conf
        except CANNOT_RUN as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            continue  # an A100 or RTX card has less shared memory than an H100: next, smaller
    run(configs[-1])
    return configs[-1]


def fastest(configs, run, timer=median_ms):
    """Time run(conf) for each config that loads on this GPU and return (the fastest, every
    (config, median ms)), having run the fastest last, so that the outputs are its own.
    Rerunning is harmless if every launch overwrites its outputs whole; a kernel that
    accumulates into its output must be reset by run() itself."""
    timed = []
    for conf in configs:
        try:
            timed.append((conf, timer(lambda: run(conf))))
        except CANNOT_RUN as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            continue
    if not timed:
        return first_that_loads(configs[-1:], run), timed  # raises the last config's error
    best = min(timed, key=lambda t: t[1])[0]  # the earlier config on a tie
    run(best)
    return best, timed


def _text(value):
    return str(value).replace("torch.", "")  # torch.bfloat16 -> "bfloat16"


def describe(conf):
    return (f"{conf.kwargs['BLOCK_M']}x{conf.kwargs['BLOCK_N']}, {conf.num_warps} warps, "
            f"{conf.num_stages} stages")


class ConfigCache:
    """specialisation key -> the config chosen for it, once per process.

    key_names name the parts of a key, for report(). With autotune=False the first candidate
    that loads is chosen and nothing is timed.
    """

    def __init__(self, key_names, autotune=True, timer=median_ms):
        self.key_names, self.autotune, self.timer = tuple(key_names), autotune, timer
        self.chosen = {}
        self.timed = {}  # key -> [(config, median ms)] of the tuning run

    def run(self, key, candidates, run):
        """run(config) with the config chosen for `key`, choosing it now among candidates()
        if this is the key's first launch. Returns the config."""
        conf = self.chosen.get(key)
        if conf is not None:
            run(conf)
            return conf
        if self.autotune:
            conf, self.timed[key] = fastest(candidates(), run, self.timer)
        else:
            conf = first_that_loads(candidates(), run)
        self.chosen[key] = conf
        return conf

    def report(self):
        """One dict per specialisation: its key's parts, the config chosen, and (autotuning)
        each timed config's median milliseconds."""
        rows = []
        for key, conf in self.chosen.items():
            row = {name: value if isinstance(value, (bool, int, float, str, type(None))) else _text(value)
                   for name, value in zip(self.key_names, key)}
            row.update(chosen=describe(conf),
                       timed_ms={describe(c): round(ms, 5) for c, ms in self.timed.get(key, [])})
            rows.append(row)
        return rows
