"""The opt-in Hopper forward (kernels/hopper.py, LECTURE_FLASH_HOPPER) against the float64
oracle: under Triton's interpreter here (its descriptors and loops, small tiles), compiled on an
sm_90 GPU. Its backward is the portable kernels', fed the row statistics it writes."""
import pytest
import torch

from helpers import check_against_oracle
from lecture_flash import available_backends, causal_attention

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="triton is not installed on this platform")
hopper = pytest.importorskip("lecture_flash.hopper")
flash = pytest.importorskip("lecture_flash.flash")

# (B, H, Hk, Tq, Tk, D): tile tails, grouped-query heads, Tq < Tk, both head dims.
SHAPES = [(1, 2, 2, 40, 40, 64), (2, 4, 2, 21, 37, 64), (1, 2, 1, 33, 33, 128)]


def runs_here(device):
    if device.type == "cuda" and torch.cuda.get_device_capability(device) != (9, 0):
        pytest.skip("the Hopper kernel runs on sm_90 only")


@pytest.fixture
def launches(monkeypatch):
    """Turn the Hopper forward on (LECTURE_FLASH_HOPPER=1) and count its launches."""
    monkeypatch.setattr(hopper, "MODE", "1")
    count = []
    forward = hopper.forward
    monkeypatch.setattr(hopper, "forward", lambda *a: count.append(1) or forward(*a))
    return count


def inputs(B, H, Hk, Tq, Tk, D, dtype, device):
    q = torch.randn(B, H, Tq, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, Hk, Tk, D, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients(launches, shape, dtype, device):
    runs_here(device)
    torch.manual_seed(sum(shape))
    check_against_oracle(*inputs(*shape, dtype, device), "triton")
    assert launches, "the Hopper forward did not run"


@pytest.mark.parametrize("mode", ["1", "ws"])
def test_the_model_layout_in_either_mode(launches, monkeypatch, mode, device):
    """q, k, v as the model's fused projection gives them ((B, T, 3, H, D) storage), with the
    key loop warp-specialised or not (the interpreter runs "ws" as a plain loop)."""
    runs_here(device)
    monkeypatch.setattr(hopper, "MODE", mode)
    torch.manual_seed(1)
    qkv = torch.randn(2, 37, 3, 2, 64, dtype=torch.bfloat16, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    check_against_oracle(q, k, v, "triton")
    assert launches


def test_a_masked_bad_value_stays_out(launches, device):
    """The contract of kernels/masking.py: a NaN value a query cannot see leaves its output as
    it was; the queries that see it get NaN."""
    runs_here(device)
    torch.manual_seed(2)
    q, k, v = inputs(1, 2, 2, 40, 40, 64, torch.bfloat16, device)
    clean = causal_attention(q, k, v, backend="triton")
    v[0, 1, 21, 5] = float("nan")
    out = causal_attention(q, k, v, backend="triton")
    assert torch.equal(out[0, 1, :21], clean[0, 1, :21]) and torch.equal(out[0, 0], clean[0, 0])
    assert torch.isnan(out[0, 1, 21:]).any(-1).all()
    assert len(launches) == 2


@pytest.mark.parametrize("case", ["dropout", "window", "float32", "head dim 32", "misaligned"])
def test_what_it_does_not_take_goes_to_the_portable_kernel(launches, case, device):
    runs_here(device)
    torch.manual_seed(3)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    D = 32 if case == "head dim 32" else 64
    q, k, v = inputs(1, 2, 2, 24, 24, D + (1 if case == "misaligned" else 0), dtype, device)
    if case == "misaligned":  # rows of 65 elements: 130 bytes apart, not a multiple of 16
        q, k, v = (t[..., :D] for t in (q, k, v))
    options = dict(dropout_p=0.1) if case == "dropout" else dict(window=(8, 0)) if case == "window" else {}
    causal_attention(q, k, v, backend="triton", **options)
    assert not launches


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["1", "ws"])
def test_forward_and_gradients_large(launches, monkeypatch, mode, device):
    runs_here(device)
    monkeypatch.setattr(hopper, "MODE", mode)
    torch.manual_seed(4)
    for shape in [(4, 16, 16, 4096, 4096, 128), (2, 32, 8, 1023, 1024, 64)]:
        check_against_oracle(*inputs(*shape, torch.bfloat16, device), "triton")
    assert launches
