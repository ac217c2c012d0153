"""kernels/settings.py: deterministic and fp32_precision, per call and as process defaults."""
import pytest
import torch

from helpers import check_against_oracle
from lecture_flash import available_backends, causal_attention, set_defaults, settings

needs_triton = pytest.mark.skipif("triton" not in available_backends(),
                                  reason="triton is not installed on this platform")


@pytest.fixture
def matmul_precision():
    """Set torch.set_float32_matmul_precision for one test, restored afterwards."""
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def test_fp32_precision_follows_pytorch_matmuls(matmul_precision):
    assert torch.get_float32_matmul_precision() == "highest"  # PyTorch's default
    assert settings.resolve_fp32_precision() == "ieee"
    for torch_setting, ours in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
        matmul_precision(torch_setting)
        assert settings.resolve_fp32_precision() == ours, torch_setting
    matmul_precision("high")
    assert settings.resolve_fp32_precision("ieee") == "ieee"  # the call's own choice wins
    with set_defaults(fp32_precision="ieee"):  # and so does a process default
        assert settings.resolve_fp32_precision() == "ieee"
    assert settings.resolve_fp32_precision() == "tf32"


def test_set_defaults_as_a_call_and_as_a_context_manager():
    assert settings.resolve_deterministic() is True
    with set_defaults(deterministic=False, fp32_precision="tf32"):
        assert settings.resolve_deterministic() is False
        assert settings.resolve_fp32_precision() == "tf32"
        with set_defaults(fp32_precision="ieee"):  # nested: only what it names changes
            assert settings.resolve_fp32_precision() == "ieee"
            assert settings.resolve_deterministic() is False
        assert settings.resolve_fp32_precision() == "tf32"
    assert settings.resolve_deterministic() is True
    assert settings.resolve_fp32_precision() == "ieee"
    try:
        set_defaults(deterministic=False)  # a plain call lasts
        assert settings.resolve_deterministic() is False
        assert settings.resolve_deterministic(True) is True
    finally:
        set_defaults(deterministic=True)


def test_pytorch_deterministic_mode_wins():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert settings.resolve_deterministic(False) is True
    finally:
        torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(deterministic="yes"), TypeError, "deterministic must be True, False or None"),
    (dict(deterministic=1), TypeError, "deterministic must be True, False or None"),
    (dict(fp32_precision="fp16"), ValueError, "fp32_precision must be one of"),
    (dict(fp32_precision=True), ValueError, "fp32_precision must be one of"),
])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_bad_arguments_are_named(kwargs, error, words, backend):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(error, match=words):
        causal_attention(q, q, q, backend=backend, **kwargs)
    with pytest.raises(error, match=words):
        set_defaults(**kwargs)


def test_environment_sets_the_initial_defaults(monkeypatch):
    monkeypatch.setenv("LECTURE_FLASH_DETERMINISTIC", "0")
    monkeypatch.setenv("LECTURE_FLASH_FP32_PRECISION", "tf32")
    assert settings._from_env() == {"deterministic": False, "fp32_precision": "tf32"}
    monkeypatch.setenv("LECTURE_FLASH_FP32_PRECISION", "fp64")
    with pytest.raises(ValueError, match="LECTURE_FLASH_FP32_PRECISION must be one of"):
        settings._from_env()
    monkeypatch.setenv("LECTURE_FLASH_DETERMINISTIC", "no")
    with pytest.raises(ValueError, match="LECTURE_FLASH_DETERMINISTIC must be 0 or 1"):
        settings._from_env()


@needs_triton
def test_triton_float32_dots_follow_the_setting(monkeypatch, matmul_precision, device):
    """What the kernels are launched with, for each way of choosing."""
    from lecture_flash import flash_launch
    seen = []
    real = flash_launch._launch
    monkeypatch.setattr(flash_launch, "_launch", lambda name, tiles, args, meta, **kw: (
        seen.append(meta["FP32_PRECISION"]), real(name, tiles, args, meta, **kw))[1])
    monkeypatch.setattr(flash_launch, "_PLANS", {})
    q = torch.randn(1, 1, 20, 16, device=device)

    def precision(**kw):
        seen.clear()
        flash_launch._PLANS.clear()  # so that every call works its launch out (and meets _launch) again
        causal_attention(q, q, q, backend="triton", **kw)
        return seen[0]

    assert precision() == "ieee"
    assert precision(fp32_precision="tf32") == "tf32"
    matmul_precision("high")
    assert precision() == "tf32"
    assert precision(fp32_precision="ieee") == "ieee"
    assert causal_attention(q.half(), q.half(), q.half(), backend="triton") is not None
    assert seen[-1] == "ieee"  # 16-bit inputs: one specialisation, whatever the setting


@needs_triton
def test_triton_float32_default_is_held_to_the_float32_rule(device):
    """With PyTorch's default matmul precision, float32 inputs get float32 dots: the error is
    held to 2x PyTorch's own float32 error (tf32 dots are about 100x that)."""
    torch.manual_seed(21)
    q, k, v = (torch.randn(1, 2, 70, 32, device=device) for _ in range(3))
    check_against_oracle(q, k, v, "triton", tf32=False)
