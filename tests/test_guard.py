"""The guard in kernels/flash.py: a Triton kernel that fails to compile or load for this GPU
never crashes a call. Simulated here by making every first launch raise what a card with too
little shared memory raises (Triton's OutOfResources), under the interpreter."""
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

import lecture_flash
from helpers import check_against_oracle
from lecture_flash import available_backends, causal_attention, decode_attention
from lecture_flash.reference import causal_attention_reference
from lecture_flash.testing import assert_by_rule

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="triton is not installed on this platform")
flash = pytest.importorskip("lecture_flash.flash")
from lecture_flash import flash_launch  # noqa: E402


@pytest.fixture
def failing(monkeypatch):
    """Make the first launch of the named kernels (all, by default) raise OutOfResources, as a
    T4 does for a config that needs more shared memory than its 64 KB. Returns the list of the
    kernels whose first launch was attempted."""
    tried = []
    real = flash_launch._launch

    def make(names=("fwd", "dq", "dkdv", "fused")):
        def launch(name, *args, **kwargs):
            tried.append(name)
            if name in names:
                raise OutOfResources(98304, 65536, "shared memory")
            return real(name, *args, **kwargs)
        monkeypatch.setattr(flash_launch, "_launch", launch)
        return tried
    return make


@pytest.fixture
def auto_is_triton(monkeypatch):
    """backend="auto" picking Triton unmeasured, as it does on CUDA (here: the interpreter)."""
    monkeypatch.setattr(lecture_flash.dispatch, "_auto_backend",
                        lambda q, measure: "triton" if lecture_flash.dispatch._triton_unavailable(q) is None
                        else "sdpa")


def _qkv(device, dtype=torch.float32, shape=(2, 3, 40, 16), grad=True):
    torch.manual_seed(0)
    return [torch.randn(shape, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def test_backend_triton_raises_one_clear_error_and_never_retries(failing, device):
    tried = failing()
    q, k, v = _qkv(device, grad=False)
    with pytest.warns(UserWarning, match="the Triton kernels cannot run here"):
        with pytest.raises(ValueError, match=r"backend='triton' cannot run here: on .*, float32 at "
                                             r"head dim 16, the fwd kernel failed to compile or "
                                             r"load: OutOfResources"):
            causal_attention(q, k, v, backend="triton")
    assert tried == ["fwd"]
    with pytest.raises(ValueError, match="backend='triton' cannot run here: on .*, the fwd kernel"):
        causal_attention(q, k, v, backend="triton")
    assert tried == ["fwd"]  # remembered: not compiled again
    assert "float32 at head dim 16" in lecture_flash.flash.supports(q)
    assert lecture_flash.flash.supports(torch.zeros(1, 1, 4, 32, device=device)) is None  # another D


def test_auto_falls_back_once_and_then_runs_sdpa(failing, auto_is_triton, device):
    """The failing call itself is computed by the reference's arithmetic (output and gradients
    under the tolerance rule), with one warning; later calls of that dtype and head dim go to
    PyTorch's SDPA without touching Triton again."""
    tried = failing()
    q, k, v = _qkv(device, grad=False)
    with pytest.warns(UserWarning, match="such calls go to PyTorch's attention from now on"):
        check_against_oracle(q, k, v, "auto")
    assert tried == ["fwd"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        check_against_oracle(q, k, v, "auto")
    assert tried == ["fwd"]


def test_a_backward_kernel_that_cannot_load_gives_the_same_gradients(failing, auto_is_triton,
                                                                     device, monkeypatch):
    """The forward ran on Triton; its backward kernels fail: the gradients come from the
    reference's arithmetic, with the dropout mask the forward drew (regenerated from its seed):
    the same gradients as the kernels', to float32 rounding."""
    q, k, v = _qkv(device)
    do = torch.randn_like(q)
    torch.manual_seed(5)
    ref = torch.autograd.grad(causal_attention(q, k, v, dropout_p=0.3, backend="triton"), (q, k, v), do)
    monkeypatch.setattr(flash_launch, "_PLANS", {})  # the backward's kernels load afresh
    failing(("dq", "dkdv", "fused"))
    torch.manual_seed(5)
    out = causal_attention(q, k, v, dropout_p=0.3)  # auto: Triton, the forward still loads
    with pytest.warns(UserWarning, match="kernel failed to compile or load"):
        got = torch.autograd.grad(out, (q, k, v), do)
    for name, a, b in zip("qkv", got, ref):
        torch.testing.assert_close(a, b, msg=f"d{name}")


@pytest.mark.filterwarnings("ignore:lecture_flash. the Triton kernels cannot run here")
def test_the_fallback_keeps_every_row_layout(failing, device):
    """Through the op directly (as a compiled graph runs it): packed rows, key lengths, a
    window and lse, each against the oracle."""
    failing()
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 24, 8, device=device) for _ in range(3))
    lengths = torch.tensor([24, 9], device=device, dtype=torch.int32)
    for options, rows in [(dict(), flash.DENSE_ROWS),
                          (dict(seqlens_k=lengths), flash.Rows(flash.KEY_LENGTHS, None, lengths, 0, 0))]:
        for left in (-1, 5):
            o, lse = flash._fwd_impl(q, k, v, None, 0.3, 0.0, "ieee", left, rows=rows)
            window = None if left < 0 else (left, 0)
            ref, ref_lse = causal_attention_reference(q, k, v, scale=0.3, window=window,
                                                      return_lse=True, **options)
            torch.testing.assert_close(o, ref)
            torch.testing.assert_close(lse * flash.LN2, ref_lse)
    cu = torch.tensor([0, 7, 20], device=device, dtype=torch.int32)
    qp, kp, vp = (torch.randn(20, 2, 8, device=device) for _ in range(3))
    o, lse = flash._fwd_impl(qp, kp, vp, None, 0.3, 0.0, "ieee",
                             rows=flash.Rows(flash.PACKED, cu, cu, 13, 13))
    ref, ref_lse = causal_attention_reference(qp, kp, vp, scale=0.3, return_lse=True, cu_seqlens_q=cu,
                                              cu_seqlens_k=cu, max_seqlen_q=13, max_seqlen_k=13)
    torch.testing.assert_close(o, ref)
    torch.testing.assert_close(lse * flash.LN2, ref_lse)


def test_decode_falls_back_and_keeps_masked_slots_out(failing, device, monkeypatch):
    """decode_attention by Triton whose kernel cannot load: the reference's arithmetic, and a
    NaN in an empty cache slot still reaches no output."""
    failing()
    monkeypatch.setattr(lecture_flash.dispatch, "_backend_for", lambda q, backend, measure: "triton")
    torch.manual_seed(2)
    q = torch.randn(2, 2, 1, 16, device=device)
    k, v = (torch.randn(2, 1, 30, 16, device=device) for _ in range(2))
    lengths = torch.tensor([30, 11], device=device)
    v[1, :, 11:] = float("nan")
    with pytest.warns(UserWarning, match="cannot run here"):
        got = decode_attention(q, k, v, lengths)
    ref = decode_attention(q, k, v, lengths, backend="reference")
    assert got.isfinite().all()
    torch.testing.assert_close(got, ref)


def test_the_failure_is_per_dtype_and_head_dim(failing, auto_is_triton, device):
    """Another dtype or head dim still runs Triton."""
    tried = failing(("fwd",))
    q, k, v = _qkv(device, grad=False)
    with pytest.warns(UserWarning):
        causal_attention(q, k, v)
    assert tried == ["fwd"]
    failing(())  # the kernels load again (another dtype's)
    q2, k2, v2 = _qkv(device, torch.bfloat16, grad=False)
    out = causal_attention(q2, k2, v2)
    assert tried == ["fwd", "fwd"]  # bfloat16 tried Triton
    ref = causal_attention_reference(q2.double(), k2.double(), v2.double())
    assert_by_rule([out], [ref], [causal_attention(q2, k2, v2, backend="sdpa")], names=("out",))
