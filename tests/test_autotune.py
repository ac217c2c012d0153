"""kernels/autotune.py: one config per specialisation, timed (or not) once, then looked up.

No GPU is needed: run() functions and kernels here are fakes, and the timer is injected.
"""
import pytest

from lecture_flash import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="triton is not installed on this platform")
autotune = pytest.importorskip("lecture_flash.autotune")
flash_launch = pytest.importorskip("lecture_flash.flash_launch")
from lecture_flash import flash_configs  # noqa: E402
OutOfResources = pytest.importorskip("triton.runtime.errors").OutOfResources
torch = pytest.importorskip("torch")

DQ_CONFIGS = flash_configs.CONFIGS["dq"]  # 128x64, 128x32, 64x32, 32x32


def too_big():
    return OutOfResources(300_000, 232_448, "shared memory")


def test_untuned_launch_falls_back_to_a_config_that_loads():
    """With autotuning off, a config this GPU cannot hold (an A100 has 163 KB of shared memory
    per block, an RTX 4090 99 KB) gives way to the next one that fits the problem."""
    tried = []

    def run(conf):
        tried.append(conf.kwargs["BLOCK_M"])
        if conf.kwargs["BLOCK_M"] > 32:
            raise too_big()

    chosen = autotune.first_that_loads(DQ_CONFIGS, run)
    assert chosen.kwargs["BLOCK_M"] == 32 and tried == [128, 128, 64, 32]

    def broken(conf):
        raise ValueError("a real error")

    with pytest.raises(ValueError, match="a real error"):  # only "too big" moves on
        autotune.first_that_loads(DQ_CONFIGS, broken)


def test_autotune_skips_configs_this_gpu_cannot_hold():
    ran = []

    def run(conf):
        if conf.kwargs["BLOCK_M"] == 128:
            raise too_big()
        ran.append(conf.kwargs["BLOCK_M"])

    def timer(fn):
        fn()
        return {64: 2.0, 32: 1.0}[ran[-1]]

    chosen, timed = autotune.fastest(DQ_CONFIGS, run, timer)
    assert chosen is DQ_CONFIGS[3] and ran == [64, 32, 32]
    assert [ms for _, ms in timed] == [2.0, 1.0]
    with pytest.raises(OutOfResources):  # nothing loads: the error, not a silent no-op
        autotune.fastest(DQ_CONFIGS[:2], run, timer)


class _FakeKernel:
    """Stands in for a jitted kernel: records (grid, BLOCK_M, num_warps) of every launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw["BLOCK_M"], kw["num_warps"]))


def _gpu_launcher(monkeypatch, autotune_on, timer=None):
    """flash_launch._launch as it runs on a GPU (CPU tests otherwise take the interpreter's fixed tile),
    with a fake dq kernel and a fresh config cache with the given timer."""
    kernel = _FakeKernel()
    cache = autotune.ConfigCache(flash_launch._TUNER.key_names, autotune=autotune_on,
                                 timer=timer or autotune.median_ms)
    monkeypatch.setattr(flash_launch, "INTERPRET", False)
    monkeypatch.setattr(flash_launch, "_JIT", {"dq": kernel})
    monkeypatch.setattr(flash_launch, "_TUNER", cache)
    q = torch.empty(2, 3, 300, 64, dtype=torch.bfloat16)
    meta = dict(TQ_BUCKET=512, TK_BUCKET=512, HEAD_DIM=64, DROPOUT=False, DOT_PRECISION="ieee")
    return kernel, cache, lambda: flash_launch._launch("dq", (300, "BLOCK_M", 6), (q,), meta)


def test_untuned_launch_path(monkeypatch):
    """With autotuning off: grid, config arguments, and the choice remembered per specialisation."""
    kernel, cache, launch = _gpu_launcher(monkeypatch, autotune_on=False)
    for _ in range(2):
        launch()
    assert kernel.launches == [((3, 6, 1), 128, 8)] * 2  # the first dq config: 300 rows in tiles of 128
    assert list(cache.chosen.values()) == [DQ_CONFIGS[0]]
    assert [r["timed_ms"] for r in flash_launch.autotune_report()] == [{}]  # nothing was timed


def test_autotuned_launch_times_each_config_once_per_specialisation(monkeypatch):
    """With autotuning on, the first launch of a specialisation times every fitting config and
    keeps the fastest; later launches of it run that one config and time nothing."""
    times = {128: 3.0, 64: 1.0, 32: 2.0}  # fake medians by BLOCK_M: the 64-row config wins
    timed = []

    def timer(fn):
        fn()
        block_m = kernel.launches[-1][1]
        timed.append(block_m)
        return times[block_m]

    kernel, cache, launch = _gpu_launcher(monkeypatch, autotune_on=True, timer=timer)
    launch()
    assert timed == [128, 128, 64, 32]  # every dq config fits 300 rows of D=64
    assert kernel.launches[-1] == ((5, 6, 1), 64, 4)  # the winner ran last: its outputs stand
    assert list(cache.chosen.values()) == [DQ_CONFIGS[2]]
    [row] = flash_launch.autotune_report()  # what bench/run.py records
    assert row["kernel"] == "dq" and row["dtype"] == "bfloat16" and row["HEAD_DIM"] == 64
    assert row["chosen"] == "64x32, 4 warps, 3 stages"
    assert list(row["timed_ms"].values()) == [3.0, 3.0, 1.0, 2.0]
    n = len(kernel.launches)
    launch()
    launch()
    assert timed == [128, 128, 64, 32] and kernel.launches[n:] == [((5, 6, 1), 64, 4)] * 2


def test_on_a_tie_the_earlier_config_wins_and_runs_last():
    """Equal medians keep the earlier (larger-tile) config, and it runs after the others, so
    the outputs left behind are the chosen config's own."""
    last = []

    def run(conf):
        last[:] = [conf]

    cache = autotune.ConfigCache(("kernel",), autotune=True, timer=lambda fn: (fn(), 1.0)[1])
    chosen = cache.run(("dq",), lambda: DQ_CONFIGS, run)
    assert chosen is DQ_CONFIGS[0] and last == [DQ_CONFIGS[0]]
    assert cache.report() == [dict(kernel="dq", chosen="128x64, 8 warps, 2 stages",
                                   timed_ms={"128x64, 8 warps, 2 stages": 1.0,
                                             "128x32, 4 warps, 3 stages": 1.0,
                                             "64x32, 4 warps, 3 stages": 1.0,
                                             "32x32, 4 warps, 1 stages": 1.0})]
