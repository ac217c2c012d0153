"""Configs chosen for the GPU in hand (kernels/devices.py, kernels/flash_configs.py), and each
platform's own rules, without the GPUs: every portability target's limits, faked device
properties for CUDA and ROCm, and a fake kernel that counts what a first launch compiles."""
import types

import pytest
import torch

import lecture_flash
from lecture_flash import available_backends, devices

flash = pytest.importorskip("lecture_flash.flash")
from lecture_flash import flash_configs, flash_launch  # noqa: E402

TARGETS = [devices.target(arch) for arch in devices.PORTABILITY]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_known_targets_and_their_limits():
    assert devices.target(75).shared_memory == 64 * 1024 and devices.target(75).label == "sm_75"
    assert devices.target(86).shared_memory == 99 * 1024
    assert devices.target(90).shared_memory == 227 * 1024
    mi300 = devices.target("gfx942")
    assert (mi300.backend, mi300.warp_size, mi300.shared_memory, mi300.label) == ("hip", 64, 65536, "gfx942")
    with pytest.raises(ValueError, match="unknown arch 'sm_99'.*known are 75, 80"):
        devices.target("sm_99")


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_candidates_never_exceed_the_targets_shared_memory(target, dtype, head_dim):
    """Every config offered on a target fits its shared memory by the estimate, for long and
    short problems alike; a target offered none for a kernel is one supports() refuses."""
    es = dtype.itemsize
    for kernel in flash_configs.CONFIGS:
        for tq, tk in ((1 << 16, 1 << 16), (256, 256), (1, 4096)):
            found = flash_configs.candidates(kernel, dtype, head_dim, es, tq, tk, target)
            for conf in found:
                assert flash_configs.shared_estimate(kernel, conf, head_dim, es, target) <= target.shared_memory
            if not found and kernel in flash_configs.NEEDED:
                assert flash_configs.unsupported(target, str(dtype), head_dim, es) is not None


def test_what_does_not_fit_is_said_with_its_figures():
    """The audit's crashes become reasons: a T4 at head dim 256, float32 at 256 on a 99 KB card."""
    t4, a10 = devices.target(75), devices.target(86)
    why = flash_configs.unsupported(t4, "float16", 256, 2)
    assert why.startswith("on sm_75, float16 at head dim 256 needs about") and "over the 65,536" in why
    assert "over the 101,376" in flash_configs.unsupported(a10, "float32", 256, 4)
    assert flash_configs.unsupported(devices.target(90), "bfloat16", 128, 2) is None
    assert flash_configs.unsupported(devices.target("gfx942"), "float32", 256, 4) is not None


def test_sm_75_is_left_to_sdpa_by_auto():
    """Triton emits no tensor-core instructions for sm_75 (compile_report shows FMA loops):
    auto takes SDPA there, in every dtype; newer GPUs keep Triton."""
    assert "no tensor-core instructions for sm_75" in flash_configs.declined(devices.target(75))
    assert all(flash_configs.declined(devices.target(a)) is None for a in devices.PORTABILITY if a != 75)


class _FakeKernel:
    """A jitted kernel stand-in: records each config it is compiled with; `loads(conf)` says
    whether the GPU can hold it."""

    def __init__(self, loads=lambda conf: True):
        self.compiled, self.loads = [], loads

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.compiled.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))
            if not self.loads(kw):
                from triton.runtime.errors import OutOfResources
                raise OutOfResources(1 << 20, 1 << 16, "shared memory")
        return launch


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.label)
def test_a_first_launch_compiles_one_config_per_kernel(monkeypatch, target):
    """The lecture's training step (bf16, D 64, T 256) on each target: with autotuning off (the
    default) each kernel's first launch compiles exactly one config, the first that fits."""
    monkeypatch.setattr(flash_launch, "INTERPRET", False)
    monkeypatch.setattr(flash_launch, "_target", lambda device: target)
    monkeypatch.setattr(flash_launch, "_TUNER", flash_launch.autotune.ConfigCache(
        flash_launch._TUNER.key_names, autotune=flash_launch.AUTOTUNE))
    assert flash_launch.AUTOTUNE is False
    fakes = {name: _FakeKernel() for name in flash_configs.CONFIGS}
    monkeypatch.setattr(flash_launch, "_JIT", fakes)
    q = torch.empty(64, 6, 256, 64, dtype=torch.bfloat16)
    meta = dict(TQ_BUCKET=256, TK_BUCKET=256, HEAD_DIM=64, DROPOUT=False, FP32_PRECISION="ieee",
                DETERMINISTIC=True, SPLIT=False)
    for name in flash_configs.CONFIGS:
        for _ in range(3):  # later launches compile nothing more
            flash_launch._launch(name, (256, "BLOCK_M", 64 * 6), (q,), meta)
        assert len(fakes[name].compiled) == 3 and len(set(fakes[name].compiled)) == 1, (name, fakes[name].compiled)


def test_a_config_that_does_not_load_is_skipped_for_the_next(monkeypatch):
    """Where the estimate was too kind (or Triton's allocation changed), the next config is
    compiled: a first call never fails while a smaller config loads."""
    monkeypatch.setattr(flash_launch, "INTERPRET", False)
    monkeypatch.setattr(flash_launch, "_target", lambda device: devices.target(90))
    monkeypatch.setattr(flash_launch, "_TUNER", flash_launch.autotune.ConfigCache(
        flash_launch._TUNER.key_names, autotune=False))
    fake = _FakeKernel(loads=lambda kw: kw["BLOCK_M"] < 128)
    monkeypatch.setattr(flash_launch, "_JIT", {"fwd": fake})
    q = torch.empty(1, 1, 4096, 64, dtype=torch.float16)
    meta = dict(TQ_BUCKET=4096, TK_BUCKET=4096, HEAD_DIM=64, DROPOUT=False, FP32_PRECISION="ieee",
                DETERMINISTIC=True, SPLIT=False)
    flash_launch._launch("fwd", (4096, "BLOCK_M", 1), (q,), meta)
    assert [c[0] for c in fake.compiled] == [128, 128, 128, 64]  # three 128-row configs fail


def test_no_config_fitting_is_a_kernel_unavailable(monkeypatch):
    """A GPU with too little shared memory for any config: the launch raises what the guard
    turns into a call to PyTorch (tests/test_guard.py)."""
    tiny = devices.Target("cuda", 80, 32, 4096, "a tiny GPU")
    monkeypatch.setattr(flash_launch, "INTERPRET", False)
    monkeypatch.setattr(flash_launch, "_target", lambda device: tiny)
    q = torch.empty(1, 1, 64, 64, dtype=torch.float16)
    meta = dict(TQ_BUCKET=64, TK_BUCKET=64, HEAD_DIM=64, DROPOUT=False, FP32_PRECISION="ieee",
                DETERMINISTIC=True, SPLIT=False)
    with pytest.raises(flash_launch.KernelUnavailable, match="no config fits this GPU \\(a tiny GPU \\(sm_80\\)\\)"):
        flash_launch.first_launch("fwd", lambda: flash_launch._launch("fwd", (64, "BLOCK_M", 1), (q,), meta))


def test_a_tuned_config_comes_first_on_its_arch(monkeypatch):
    """flash_tuned.TUNED (written from GPU reports) puts its config first on that arch only."""
    from lecture_flash import flash_tuned
    monkeypatch.setattr(flash_tuned, "TUNED", {("sm_86", "dq", "bfloat16", 64, 4096, 4096): (64, 32, 4, 3)})
    first = flash_configs.candidates("dq", torch.bfloat16, 64, 2, 4096, 4096, devices.target(86))[0]
    assert flash_configs._shape(first) == (64, 32, 4, 3)
    other = flash_configs.candidates("dq", torch.bfloat16, 64, 2, 4096, 4096, devices.target(89))[0]
    assert flash_configs._shape(other) != (64, 32, 4, 3)


@pytest.fixture
def rocm(monkeypatch):
    """torch as ROCm's build presents an MI300X: device type "cuda", torch.version.hip set."""
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    props = types.SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-",
                                  shared_memory_per_block_optin=65536, warp_size=64, major=9, minor=4)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    devices._target_of.cache_clear()
    yield props
    devices._target_of.cache_clear()


def test_rocm_is_found_and_its_gpu_named(rocm):
    target = devices.target_of(torch.device("cuda", 0))
    assert (target.backend, target.arch, target.shared_memory) == ("hip", "gfx942", 65536)
    assert target.describe() == "AMD Instinct MI300X (gfx942)"
    assert devices.platform() == "rocm"


def test_nvidia_targets_are_read_off_the_device(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA A10", major=8, minor=6, warp_size=32,
                                  shared_memory_per_block_optin=101376)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    devices._target_of.cache_clear()
    try:
        assert devices.target_of(torch.device("cuda", 0)) == devices.Target(
            "cuda", 86, 32, 101376, "NVIDIA A10")
        del props.shared_memory_per_block_optin  # an older torch: the table's figure
        devices._target_of.cache_clear()
        assert devices.target_of(torch.device("cuda", 0)).shared_memory == 99 * 1024
    finally:
        devices._target_of.cache_clear()


def test_rocm_has_no_tf32(rocm, monkeypatch):
    """AMD's Triton has no tf32 dots: PyTorch's "high" precision runs float32 as "ieee" there,
    and a call asking for tf32 by name is refused."""
    q = torch.zeros(1, 1, 4, 16)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert flash._precision(q) == "ieee"
    with pytest.raises(ValueError, match="fp32_precision='tf32': ROCm's Triton has no tf32 dots"):
        flash._precision(q, "tf32")
    monkeypatch.setattr(torch.version, "hip", None)
    assert flash._precision(q) == "tf32" and flash._precision(q.half()) == "ieee"


def test_available_backends_names_the_platform():
    found = available_backends("cpu")
    assert list(found) == ["triton", "sdpa", "reference"] or list(found) == ["sdpa", "reference"]
    assert found.platform == "cpu" and "platform='cpu'" in repr(found)
    assert lecture_flash.available_backends() == found or torch.cuda.is_available()
