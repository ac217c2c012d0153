"""Masked positions never influence the output (kernels/masking.py's contract), on every
backend: a NaN or inf in a key or value that a query cannot see leaves that query's output (and
its dQ) exactly as if the value were finite; a query that sees one gets NaN."""
import pytest
import torch

from lecture_flash import available_backends, causal_attention, decode_attention
from lecture_flash.reference import causal_attention_reference, naive_causal_attention
from lecture_flash.testing import assert_by_rule

BACKENDS = ["reference", "sdpa", "auto", "triton"]
EACH = ["reference", "sdpa", "triton"]  # "auto" is one of these (sdpa here, triton on a GPU)
# The interpreter computes with NumPy, which warns about the NaNs these tests feed it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
# (Tq, Tk, bad position): off the 16x16 interpreter tiles' edges, inside a diagonal tile, with
# Tq < Tk as well (the KV-cache case).
CASES = [(40, 40, 21), (37, 50, 30), (20, 20, 3)]


def needs(backend, device):
    if backend == "triton" and "triton" not in available_backends(device):
        pytest.skip("triton is not installed here")


def attend(backend, q, k, v):
    return causal_attention(q, k, v, backend=backend, fp32_precision="ieee")


@pytest.mark.parametrize("where, value", [("k", float("nan")), ("v", float("nan")), ("v", float("inf"))],
                         ids=["k-nan", "v-nan", "v-inf"])
@pytest.mark.parametrize("Tq, Tk, bad", CASES, ids=str)
@pytest.mark.parametrize("backend", EACH)
def test_a_bad_key_or_value_reaches_only_the_queries_that_see_it(backend, Tq, Tk, bad, where, value, device):
    needs(backend, device)
    if backend == "triton" and Tq == 20 and device.type == "cpu":
        pytest.skip("under the interpreter the two cases that cross tiles suffice (suite time)")
    torch.manual_seed(Tq + bad)
    q = torch.randn(1, 2, Tq, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 2, Tk, 16, device=device) for _ in range(2))
    clean = attend(backend, q, k, v)
    k, v = k.clone(), v.clone()  # the clean graph keeps the originals for its backward
    (k if where == "k" else v)[0, 1, bad, 5] = value
    out = attend(backend, q, k, v)
    blind = bad - (Tk - Tq)  # queries before this one cannot see the bad position
    torch.testing.assert_close(out[0, 1, :blind], clean[0, 1, :blind], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 0], clean[0, 0], rtol=0, atol=0)  # the other head
    seen = out[0, 1, blind:]
    if where == "v" or value != value:  # an infinite key may only zero its weight (score -inf)
        assert (~torch.isfinite(seen)).any(-1).all(), "a query that sees the bad position stayed finite"
    # The dQ of the queries that cannot see it is that of the clean inputs.
    do = torch.randn_like(out)
    do[0, 1, blind:] = 0  # the loss reads only outputs that stay finite
    do[:, :, :, :][torch.isnan(out)] = 0
    dq, = torch.autograd.grad(out, q, do)
    dq_clean, = torch.autograd.grad(clean, q, do)
    torch.testing.assert_close(dq[0, 1, :blind], dq_clean[0, 1, :blind], rtol=0, atol=0)
    torch.testing.assert_close(dq[0, 0], dq_clean[0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("where, value", [("k", float("nan")), ("v", float("nan")), ("v", float("inf"))],
                         ids=["k-nan", "v-nan", "v-inf"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_without_gradients_the_output_is_checked_instead(backend, where, value):
    """On a CPU without gradients the PyTorch paths attend first and check the output (a masked
    non-finite entry can only reach it as NaN); the contract is the same."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with torch.no_grad():
        clean = attend(backend, q, k, v)
        (k if where == "k" else v)[0, 1, 21, 5] = value
        out = attend(backend, q, k, v)
    assert torch.equal(out[0, 1, :21], clean[0, 1, :21]) and torch.equal(out[0, 0], clean[0, 0])
    if where == "v" or value != value:
        assert (~torch.isfinite(out[0, 1, 21:])).any(-1).all()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_views_of_one_qkv_tensor_keep_the_contract(backend):
    """q, k, v as a fused projection gives them (views of one tensor, which the CPU check sums
    at once): a NaN in a key the early queries cannot see stays out of their outputs and dQ."""
    from lecture_flash.modules import split_heads
    torch.manual_seed(4)
    qkv = torch.randn(1, 40, 3 * 32, requires_grad=True)
    clean = attend(backend, *split_heads(qkv, 2))
    bad = qkv.detach().clone()
    bad[0, 21, 2 * 32 + 5] = float("nan")  # value of position 21, head 0
    bad.requires_grad_(True)
    out = attend(backend, *split_heads(bad, 2))
    assert torch.equal(out[0, :, :21], clean[0, :, :21]) and torch.equal(out[0, 1], clean[0, 1])
    assert torch.isnan(out[0, 0, 21:]).any(-1).all()
    do = torch.zeros_like(out)
    do[0, :, :21] = 1.0
    g_bad, = torch.autograd.grad(out, bad, do)
    g_clean, = torch.autograd.grad(clean, qkv, do)
    assert torch.equal(g_bad[0, :21, :32], g_clean[0, :21, :32])  # dQ of the blind queries


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_a_bad_query_in_one_qkv_tensor_is_its_own(backend):
    """The one sum over the qkv tensor also meets the queries: a NaN query fails the check and
    the exact path runs, where that query's row alone is NaN."""
    from lecture_flash.modules import split_heads
    torch.manual_seed(5)
    qkv = torch.randn(1, 40, 3 * 32, requires_grad=True)
    clean = attend(backend, *split_heads(qkv, 2))
    bad = qkv.detach().clone()
    bad[0, 7, 3] = float("nan")  # query of position 7, head 0
    bad.requires_grad_(True)
    out = attend(backend, *split_heads(bad, 2))
    assert torch.isnan(out[0, 0, 7]).all()
    keep = torch.ones(40, dtype=torch.bool)
    keep[7] = False
    assert torch.equal(out[0, 0, keep], clean[0, 0, keep]) and torch.equal(out[0, 1], clean[0, 1])


@pytest.mark.parametrize("backend", EACH)
def test_a_bad_value_reaches_only_its_queries_in_bfloat16(backend, device):
    """The same in bfloat16, with a value past a row's length (seqlens_k) as well. (Triton's
    interpreter gave inf - inf = 0 in bfloat16, so the kernel's finiteness test let an inf
    through there: it runs in float32 under the interpreter now.)"""
    needs(backend, device)
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 2, 40, 16, device=device, dtype=torch.bfloat16) for _ in range(3))
    lengths = torch.tensor([40, 30], device=device)
    clean = causal_attention(q, k, v, backend=backend, seqlens_k=lengths)
    v[0, 1, 21, 5] = v[1, 0, 33, 2] = float("inf")  # the second lies past row 1's 30 keys
    out = causal_attention(q, k, v, backend=backend, seqlens_k=lengths)
    assert torch.equal(out[0, 1, :21], clean[0, 1, :21]) and torch.equal(out[1], clean[1])
    assert (~torch.isfinite(out[0, 1, 21:])).any(-1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_query_row_is_its_own(backend, device):
    needs(backend, device)
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 16, device=device) for _ in range(3))
    clean = attend(backend, q, k, v)
    q[0, 0, 17, 2] = float("nan")
    out = attend(backend, q, k, v)
    assert torch.isnan(out[0, 0, 17]).any()
    rows = [i for i in range(40) if i != 17]
    torch.testing.assert_close(out[0, 0, rows], clean[0, 0, rows], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_strides_are_read_right(backend, device):
    """q, k, v as windows of one buffer (stride_t = stride_d = 1): every backend reads them as
    their values say (the sdpa backend copies them first)."""
    needs(backend, device)
    torch.manual_seed(6)
    buf = torch.randn(2 * 3 * 64 + 16, device=device)
    q, k, v = (buf.as_strided((2, 3, 37, 16), (3 * 64, 64, 1, 1), o) for o in (0, 5, 9))
    expect = causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="reference")
    torch.testing.assert_close(attend(backend, q, k, v), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1e10, 1e30, -1e10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", EACH)
def test_huge_scales_stay_finite_and_right(backend, dtype, scale, device):
    """At scale 1e10 the scaled scores pass 1e11: the Triton forward used to round its row
    maximum at that size and let exp2 overflow (NaN). Softmax rows are one-hot here; every
    backend's output must meet the rule against the float64 oracle, and the gradients of ours
    must stay finite. (Their accuracy does not hold at such scales: the backward's
    delta = rowsum(dO * O) stands for rowsum(P * dP) only up to rounding, and the scale
    multiplies that rounding into dQ and dK, as in FlashAttention-2; PyTorch's own fused CPU
    SDPA is worse, NaN at 1e10.)"""
    needs(backend, device)
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 45, 16, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = causal_attention(q, k, v, scale=scale, backend=backend, fp32_precision="ieee")
    with torch.no_grad():
        ref = causal_attention_reference(q.double(), k.double(), v.double(), scale=scale)
        low = naive_causal_attention(q, k, v, scale)
    assert_by_rule([out.detach()], [ref], [low], names=("out",))
    if backend in ("reference", "triton"):
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("scale", [1e39, 1e300, 10**40, 10**400])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scale_past_float32_is_refused(backend, scale):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="scale must be finite and at most 3.403e"):
        causal_attention(q, q, q, scale=scale, backend=backend)


def test_decode_attention_keeps_bad_slots_out(device):
    torch.manual_seed(8)
    q = torch.randn(2, 2, 1, 16, device=device)
    k, v = (torch.randn(2, 2, 12, 16, device=device) for _ in range(2))
    lengths = torch.tensor([5, 12], device=device)
    clean = decode_attention(q, k, v, lengths)
    k[0, :, 7:] = float("nan")  # past row 0's length: never seen
    v[0, :, 9:] = float("inf")
    v[1, 0, 3, 0] = float("nan")  # inside row 1's length: row 1, head 0 sees it
    out = decode_attention(q, k, v, lengths)
    torch.testing.assert_close(out[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1, 1], clean[1, 1], rtol=0, atol=0)
    assert torch.isnan(out[1, 0]).any()


@pytest.mark.parametrize("where", ["k", "v"])
def test_the_atomic_dq_backward_keeps_bad_keys_out_too(where, device):
    needs("triton", device)
    torch.manual_seed(9)
    q = torch.randn(1, 1, 40, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 1, 40, 16, device=device) for _ in range(2))
    clean = causal_attention(q, k, v, backend="triton", deterministic=False)
    k, v = k.clone(), v.clone()  # the clean graph keeps the originals for its backward
    (k if where == "k" else v)[0, 0, 21, 5] = float("nan")
    out = causal_attention(q, k, v, backend="triton", deterministic=False)
    do = torch.randn_like(out)
    do[0, 0, 21:] = 0
    dq, = torch.autograd.grad(out, q, do)
    dq_clean, = torch.autograd.grad(clean, q, do)
    torch.testing.assert_close(dq[0, 0, :21], dq_clean[0, 0, :21])  # atomics: any order
