"""The pure-PyTorch backends ("reference", "sdpa", "auto") against the float64 oracle."""
import pytest
import torch

from helpers import check_against_oracle
import lecture_flash
from lecture_flash import causal_attention, decode_attention, scaled_dot_product_attention
from lecture_flash.reference import causal_attention_reference, masked_scores, naive_causal_attention
from lecture_flash.testing import assert_by_rule
from lecture_flash.validation import kv_heads_expanded

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
BACKENDS = ["reference", "sdpa", "auto"]


def known_sdpa_cpu_bf16(request, backend, dtype, device):
    """PyTorch's CPU SDPA kernel rounds more in its bf16 backward than plain bf16 math does:
    its dV error reaches 2.3x the math path's on some shapes, over our 2x rule. That is
    PyTorch's kernel, not ours; "auto" avoids it. Not strict: most shapes pass."""
    if backend == "sdpa" and dtype == torch.bfloat16 and device.type == "cpu":
        request.applymarker(pytest.mark.xfail(
            reason="PyTorch CPU SDPA bf16 backward precision (see known_sdpa_cpu_bf16)", strict=False))


def skip_if_unavailable(backend, device):
    if backend == "triton" and "triton" not in __import__("lecture_flash").available_backends(device):
        pytest.skip("triton is not installed here")


def rand(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 100, 257])
@pytest.mark.parametrize("D", [8, 24, 64, 80])
def test_square(request, backend, dtype, T, D, device):
    torch.manual_seed(T * 1000 + D)
    known_sdpa_cpu_bf16(request, backend, dtype, device)
    q, k, v = (rand(2, 3, T, D, dtype=dtype, device=device) for _ in range(3))
    check_against_oracle(q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tq, Tk", [(1, 239), (7, 20), (113, 203), (100, 257)])
def test_fewer_queries_than_keys(backend, dtype, Tq, Tk, device):
    torch.manual_seed(Tq + Tk)
    q = rand(2, 2, Tq, 40, dtype=dtype, device=device)
    k, v = (rand(2, 2, Tk, 40, dtype=dtype, device=device) for _ in range(2))
    check_against_oracle(q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_model_layout(backend, dtype, device):
    """q, k, v as the model makes them: strided views of one (B, T, 3, H, D) projection."""
    torch.manual_seed(1)
    qkv = rand(2, 37, 3, 4, 24, dtype=dtype, device=device)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    check_against_oracle(q, k, v, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dimensional_input(backend, device):
    torch.manual_seed(2)
    q, k, v = (rand(6, 19, 16, dtype=torch.float32, device=device) for _ in range(3))
    out = check_against_oracle(q, k, v, backend)[0]
    assert out.shape == (6, 19, 16)


# Any real scale, as in scaled_dot_product_attention: 0 gives the running mean of v, and a
# negative one favours the least similar keys (the Triton forward folds its sign into q).
@pytest.mark.parametrize("scale", [384**-0.5, -0.3, 0.0])
@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_custom_scale(backend, scale, device):
    skip_if_unavailable(backend, device)
    torch.manual_seed(3)
    q, k, v = (rand(1, 2, 70, 16, dtype=torch.float32, device=device) for _ in range(3))
    check_against_oracle(q, k, v, backend, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_nan_in_one_batch_element_stays_there(backend, device):
    skip_if_unavailable(backend, device)
    torch.manual_seed(4)
    q, k, v = (rand(3, 2, 20, 16, dtype=torch.float32, device=device).requires_grad_() for _ in range(3))
    with torch.no_grad():
        k[1, 0, 5, 3] = float("nan")
    out = causal_attention(q, k, v, backend=backend)
    out.sum().backward()
    clean = [0, 2]
    assert torch.isfinite(out[clean]).all() and torch.isnan(out[1]).any()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g[clean]).all()


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("Hk, Tq, Tk", [(2, 37, 37), (1, 20, 45)], ids=["gqa", "mqa-Tq<Tk"])
def test_grouped_query_heads(backend, Hk, Tq, Tk, device):
    """k, v with Hk heads, each read by H // Hk query heads (Hk = 1: multi-query)."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(Hk + Tq)
    q = rand(1, 4, Tq, 24, dtype=torch.float32, device=device)
    k, v = (rand(1, Hk, Tk, 24, dtype=torch.float32, device=device) for _ in range(2))
    out, _, dk, dv = check_against_oracle(q, k, v, backend, fp32_precision="ieee"
                                          if backend == "triton" else None)
    assert dk.shape == k.shape and dv.shape == v.shape


def _lse_and_grads(attend, q, k, v, do, dl):
    """(out, lse, dq, dk, dv) of attend, the gradients of sum(out * do) + sum(lse * dl)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = attend(q, k, v)
    return [out, lse, *torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))]


def _naive_lse_attention(q, k, v):
    """PyTorch's math in the inputs' dtype, and its log-sum-exp in float32: the rule's baseline."""
    scores = masked_scores(q.float(), kv_heads_expanded(k, q.shape[1]).float(), q.shape[-1] ** -0.5)
    return naive_causal_attention(q, k, v), torch.logsumexp(scores, dim=-1)


LSE_CASES = [(backend, dtype, "") for backend in BACKENDS for dtype in (torch.float32, torch.bfloat16)] + [
    ("triton", torch.float32, ""), ("triton", torch.bfloat16, "one launch"),
    ("triton", torch.bfloat16, "two launches"), ("triton", torch.bfloat16, "atomic dQ")]


@pytest.mark.parametrize("backend, dtype, path", LSE_CASES, ids=[f"{b}-{str(d)[6:]}-{p}" for b, d, p in LSE_CASES])
def test_return_lse_and_its_gradient(monkeypatch, backend, dtype, path, device):
    """return_lse=True: the (B, H, Tq) natural log-sum-exp beside the output, held to the rule
    with its gradient (a loss that uses both), through every backward path of the kernel."""
    skip_if_unavailable(backend, device)
    if path == "two launches":
        monkeypatch.setattr(__import__("lecture_flash").flash_launch, "FUSED_MAX_TK", 0)
    deterministic = False if path == "atomic dQ" else None
    Tk = 45
    torch.manual_seed(Tk)
    q = rand(1, 4, 30, 16, dtype=dtype, device=device)
    k, v = (rand(1, 2, Tk, 16, dtype=dtype, device=device) for _ in range(2))
    do, dl = rand(1, 4, 30, 16, dtype=dtype, device=device), rand(1, 4, 30, dtype=torch.float32, device=device)
    options = {} if backend != "triton" else {"deterministic": deterministic, "fp32_precision": "ieee"}
    got = _lse_and_grads(lambda a, b, c: causal_attention(a, b, c, backend=backend, return_lse=True,
                                                          **options), q, k, v, do, dl)
    ref = _lse_and_grads(lambda a, b, c: causal_attention_reference(a, b, c, return_lse=True),
                         *(t.double() for t in (q, k, v, do, dl)))
    low = _lse_and_grads(_naive_lse_attention, q, k, v, do, dl)
    assert got[1].shape == (1, 4, 30) and got[1].dtype == torch.float32
    assert_by_rule(got, ref, low, names=("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_lse_merges_attention_over_two_halves_of_the_keys(backend, device):
    """A decode query (it sees every key) attended over each half of the keys: the halves'
    outputs weighted by exp(lse_half - lse) are the whole's output, logaddexp of their lse its
    lse, and the gradients through the merge (which run through lse) the whole's gradients."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(8)
    q = rand(1, 4, 1, 16, dtype=torch.float32, device=device)
    k, v = (rand(1, 2, 40, 16, dtype=torch.float32, device=device) for _ in range(2))
    do = rand(1, 4, 1, 16, dtype=torch.float32, device=device)
    options = {"fp32_precision": "ieee"} if backend == "triton" else {}

    def whole(a, b, c):
        return causal_attention(a, b, c, backend=backend, return_lse=True, **options)

    def merged(a, b, c):
        (o1, l1), (o2, l2) = (whole(a, b[:, :, part], c[:, :, part])
                              for part in (slice(0, 17), slice(17, 40)))
        lse = torch.logaddexp(l1, l2)
        return (o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]), lse

    zero = torch.zeros(1, 4, 1, device=device)
    for a, b in zip(_lse_and_grads(merged, q, k, v, do, zero), _lse_and_grads(whole, q, k, v, do, zero)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("Tq, Tk, left", [(37, 37, 5), (20, 45, 0), (33, 33, 100)])
def test_sliding_window(backend, Tq, Tk, left, device):
    """window=(left, 0): query i sees keys i + Tk - Tq - left .. i + Tk - Tq, on every backend,
    with the log-sum-exp over the same keys."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(Tq + left)
    q = rand(1, 4, Tq, 16, dtype=torch.float32, device=device)
    k, v = (rand(1, 2, Tk, 16, dtype=torch.float32, device=device) for _ in range(2))
    options = {"fp32_precision": "ieee"} if backend == "triton" else {}
    check_against_oracle(q, k, v, backend, window=(left, 0), **options)
    _, lse = causal_attention(q, k, v, backend=backend, window=(left, 0), return_lse=True, **options)
    _, ref = causal_attention_reference(q.double(), k.double(), v.double(), window=(left, 0),
                                        return_lse=True)
    torch.testing.assert_close(lse.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_sliding_window_with_very_negative_scores(backend, device):
    """Every score about -1600: each row's softmax is still uniform over its window (a running
    max taken from 0 instead of the row's own would make every weight underflow)."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(8)
    u = rand(1, 1, 1, 16, dtype=torch.float32, device=device).abs() + 1
    q, k = (-u).expand(1, 1, 40, 16), u.expand(1, 1, 40, 16)
    v = rand(1, 1, 40, 16, dtype=torch.float32, device=device)
    out = causal_attention(q, k, v, backend=backend, window=(5, 0), scale=100.0)
    want = torch.stack([v[0, 0, max(0, i - 5):i + 1].mean(0) for i in range(40)])
    torch.testing.assert_close(out[0, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_sliding_window_keeps_out_what_lies_behind_it(backend, device):
    """A NaN key/value that a query's causal past holds but its window has left behind does not
    reach it; queries whose window holds it get NaN."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(7)
    q, k, v = (rand(1, 1, 40, 16, dtype=torch.float32, device=device) for _ in range(3))
    v[0, 0, 3, 1] = float("nan")
    out = causal_attention(q, k, v, backend=backend, window=(6, 0))  # rows 3..9 see key 3
    assert torch.isnan(out[0, 0, 3:10]).any(-1).all()
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(out[0, 0, 10:]).all()


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_bthd_layout(backend, device):
    """layout="bthd": (B, T, H, D) in and out (grouped heads and Tq < Tk here), the same numbers
    as the default layout on the transposed tensors, gradients included."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(6)
    q = rand(1, 20, 4, 16, dtype=torch.bfloat16, device=device)
    k, v = (rand(1, 29, 2, 16, dtype=torch.bfloat16, device=device) for _ in range(2))
    out = causal_attention(q, k, v, layout="bthd", backend=backend)
    t = [x.transpose(1, 2) for x in (q, k, v)]
    assert out.shape == q.shape
    assert torch.equal(out, causal_attention(*t, backend=backend).transpose(1, 2))
    check_against_oracle(*t, backend, run=lambda a, b, c: causal_attention(
        a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), layout="bthd",
        backend=backend).transpose(1, 2))


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_grouped_query_nan_reaches_only_its_group(backend, device):
    """A NaN in key/value head 0 reaches query heads 0 and 1 (its group of 2), from the
    position it sits at on; query heads 2 and 3 read the other key/value head and stay finite."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(5)
    q = rand(1, 4, 20, 16, dtype=torch.float32, device=device)
    k, v = (rand(1, 2, 20, 16, dtype=torch.float32, device=device) for _ in range(2))
    v[0, 0, 7, 2] = float("nan")
    out = causal_attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, :2, 7:]).any(dim=-1).all() and torch.isfinite(out[0, :2, :7]).all()
    assert torch.isfinite(out[0, 2:]).all()


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_dropout_keeps_about_one_minus_p(backend, device):
    """Dropout without an exposed mask: the mean output scales right, and eval-mode is exact."""
    torch.manual_seed(5)
    v = torch.ones(4, 4, 64, 16, device=device)
    q = k = torch.zeros_like(v)
    outs = torch.stack([causal_attention(q, k, v, dropout_p=0.25, backend=backend) for _ in range(20)])
    assert abs(outs.mean().item() - 1.0) < 0.02  # kept weights are scaled by 1 / (1 - p)
    assert not torch.equal(outs[0], outs[1])


# decode_attention: a fixed-size cache with per-row lengths on the device (CUDA-graph decoding).

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Tq", [1, 3])
def test_decode_attention_matches_the_oracle_row_by_row(Tq, dtype, device):
    torch.manual_seed(20 + Tq)
    B, H, S, D = 4, 2, 37, 24
    q = rand(B, H, Tq, D, dtype=dtype, device=device)
    k, v = (rand(B, H, S, D, dtype=dtype, device=device) for _ in range(2))
    lengths = [S, 20, Tq, 5][:B]
    k[1, :, 20:], v[1, :, 20:] = 1e4, -1e4  # slots past a row's length hold anything finite
    out = decode_attention(q, k, v, torch.tensor(lengths, device=device))
    assert out.shape == q.shape and out.dtype == dtype
    for b, n in enumerate(lengths):
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
        ref = causal_attention_reference(qb.double(), kb.double(), vb.double())
        low = naive_causal_attention(qb, kb, vb)
        assert_by_rule([out[b:b + 1]], [ref], [low], names=(f"row {b} (length {n})",))


def test_decode_attention_grouped_query_heads(device):
    torch.manual_seed(21)
    B, H, Hk, S, D = 2, 4, 2, 30, 16
    q = rand(B, H, 2, D, dtype=torch.float32, device=device)
    k, v = (rand(B, Hk, S, D, dtype=torch.float32, device=device) for _ in range(2))
    out = decode_attention(q, k, v, torch.tensor([S, 9], device=device))
    for b, n in enumerate([S, 9]):
        ref = causal_attention_reference(q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                         v[b:b + 1, :, :n].double())
        torch.testing.assert_close(out[b:b + 1], ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("Tq, window, Hk, scale, layout", [
    (1, None, 2, None, "contiguous"),
    (1, None, 1, None, "strided"),    # one key/value head; a cache laid out (B, S, Hk, D)
    (1, None, 2, -0.3, "contiguous"),  # a negative scale (SDPA's fused kernels need > 0)
    (1, (3, 0), 2, None, "contiguous"),
    (3, None, 2, None, "strided"),
    (3, (2, 0), 1, 0.2, "contiguous"),
])
def test_decode_attention_rows_of_one_length(backend, Tq, window, Hk, scale, layout, device):
    """Every row holding the same number of keys (one sequence, a batch in step): the CPU paths
    attend to the cache's first slots only (no key-length mask); the slots past them, NaN here,
    are never read."""
    torch.manual_seed(24 + Tq)
    B, H, S, D, n = 2, 4, 19, 16, 11
    q = rand(B, H, Tq, D, dtype=torch.float32, device=device)
    if layout == "strided":
        k, v = (rand(B, S, Hk, D, dtype=torch.float32, device=device).transpose(1, 2)
                for _ in range(2))
    else:
        k, v = (rand(B, Hk, S, D, dtype=torch.float32, device=device) for _ in range(2))
    k[:, :, n:], v[:, :, n:] = float("nan"), float("inf")
    out = decode_attention(q, k, v, torch.full((B,), n, device=device), scale=scale,
                           window=window, backend=backend)
    ref = causal_attention_reference(q.double(), k[:, :, :n].double(), v[:, :, :n].double(),
                                     scale=scale, window=window or (-1, 0))
    torch.testing.assert_close(out, ref.float(), atol=2e-6, rtol=2e-5)
    # A non-finite key reaches the last query, which sees it, as NaN; the earlier queries,
    # which do not, compute as before.
    k[0, :, n - 1] = float("nan")
    again = decode_attention(q, k, v, torch.full((B,), n, device=device), scale=scale,
                             window=window, backend=backend)
    assert torch.isnan(again[0, :, -1]).all()
    torch.testing.assert_close(again[0, :, :-1], out[0, :, :-1], rtol=0, atol=0)
    torch.testing.assert_close(again[1], out[1], rtol=0, atol=0)


def test_decode_attention_gives_zeros_to_a_query_that_sees_no_key(device):
    q, k, v = (rand(2, 1, 3, 8, dtype=torch.float32, device=device) for _ in range(3))
    out = decode_attention(q, k, v, torch.tensor([1, 0], device=device))
    assert torch.isfinite(out).all()
    assert (out[0, :, :2] == 0).all() and torch.allclose(out[0, :, 2], v[0, :, 0])  # sees key 0
    assert (out[1] == 0).all()


def test_decode_attention_traces_without_reading_lengths_on_the_host(device):
    """A graph break or a data-dependent branch would make fullgraph compilation fail; a CUDA
    graph needs the same (lengths stay on the device)."""
    torch.manual_seed(22)
    q = rand(2, 2, 1, 16, dtype=torch.float32, device=device)
    k, v = (rand(2, 2, 12, 16, dtype=torch.float32, device=device) for _ in range(2))
    compiled = torch.compile(decode_attention, fullgraph=True, backend="eager")
    for lengths in ([12, 4], [3, 7]):
        seqlens = torch.tensor(lengths, device=device)
        torch.testing.assert_close(compiled(q, k, v, seqlens), decode_attention(q, k, v, seqlens))


@pytest.mark.parametrize("seqlens, error, words", [
    ([3, 3], TypeError, "cache_seqlens must be a torch.Tensor"),
    (torch.tensor([3.0, 3.0]), ValueError, r"cache_seqlens must be a \(2,\) integer tensor"),
    (torch.tensor([3]), ValueError, r"cache_seqlens must be a \(2,\) integer tensor"),
    # Past the cache (checked on CPU; a GPU clamps, since reading the values would sync).
    (torch.tensor([6, 3]), ValueError, r"cache_seqlens must lie in \[0, the cache's 5 slots\], "
                                       "got values from 3 to 6"),
    (torch.tensor([-1, 3]), ValueError, r"cache_seqlens must lie in \[0, the cache's 5 slots\]"),
])
def test_decode_attention_bad_lengths_are_named(seqlens, error, words):
    q, k = torch.randn(2, 1, 1, 8), torch.randn(2, 1, 5, 8)
    with pytest.raises(error, match=words):
        decode_attention(q, k, k, seqlens)


@pytest.mark.gpu
def test_decode_attention_in_a_cuda_graph(device):
    torch.manual_seed(23)
    q = rand(2, 4, 1, 64, dtype=torch.bfloat16, device=device)
    k, v = (rand(2, 4, 256, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    seqlens = torch.tensor([1, 1], device=device)
    decode_attention(q, k, v, seqlens)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, seqlens)
    for lengths in ([5, 200], [256, 1]):
        seqlens.copy_(torch.tensor(lengths, device=device))
        graph.replay()
        torch.testing.assert_close(out, decode_attention(q, k, v, seqlens), rtol=0, atol=0)


# scaled_dot_product_attention: PyTorch's signature and meaning, for monkey-patching.

SDPA_OURS = [  # (q shape, k shape, options): the calls that run causal_attention
    ((2, 4, 10, 16), (2, 4, 10, 16), {"is_causal": True}),
    ((2, 4, 7, 16), (2, 4, 19, 16), {"is_causal": True}),  # top-left: keys 7.. seen by none
    ((2, 4, 10, 16), (2, 2, 10, 16), {"is_causal": True, "enable_gqa": True}),
    ((6, 10, 16), (6, 10, 16), {"is_causal": True, "scale": 0.3, "dropout_p": 0.0}),
]


@pytest.mark.parametrize("qs, ks, options", SDPA_OURS, ids=["square", "Tq<Tk", "gqa", "3-D"])
def test_sdpa_entry_runs_ours_and_means_what_pytorch_means(monkeypatch, qs, ks, options, device):
    torch.manual_seed(9)
    q = rand(*qs, dtype=torch.float32, device=device)
    k, v = (rand(*ks, dtype=torch.float32, device=device) for _ in range(2))
    ran = []
    real = lecture_flash.sdpa.causal_attention
    monkeypatch.setattr(lecture_flash.sdpa, "causal_attention", lambda *a, **kw: (ran.append(1), real(*a, **kw))[1])
    got = _lse_free_grads(scaled_dot_product_attention, q, k, v, options)
    want = _lse_free_grads(torch.nn.functional.scaled_dot_product_attention, q, k, v, options)
    assert ran, "causal_attention did not run"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _lse_free_grads(sdpa, q, k, v, options):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = sdpa(q, k, v, **options)
    return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]


def test_sdpa_entry_hands_the_rest_to_pytorch_saying_why_once(monkeypatch, device):
    monkeypatch.setattr(lecture_flash.sdpa, "_SAID", set())
    torch.manual_seed(10)
    q, k, v = (rand(2, 2, 9, 8, dtype=torch.float32, device=device) for _ in range(3))
    pad = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=device)
    pad[1, ..., 6:] = False
    calls = [dict(attn_mask=pad), dict(), dict(is_causal=True, scale=0.5)]
    with pytest.warns(UserWarning) as record:
        for options in calls + calls:  # every reason warns the first time only
            got = scaled_dot_product_attention(q, k, v, **options)
            torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, **options))
    assert [str(w.message) for w in record] == [
        "lecture_flash.scaled_dot_product_attention: an attn_mask other than (B or 1, 1, T, T) over as "
        "many queries as keys goes to PyTorch's SDPA",
        "lecture_flash.scaled_dot_product_attention: non-causal attention goes to PyTorch's SDPA"]
    with pytest.warns(UserWarning, match="without enable_gqa=True goes to PyTorch"):
        got = scaled_dot_product_attention(q, k[:, :1], v[:, :1], is_causal=True)  # it broadcasts
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :1], v[:, :1], is_causal=True))


@pytest.mark.parametrize("batch", [2, 1])
def test_sdpa_entry_runs_ours_for_a_right_padded_causal_mask(monkeypatch, batch, device):
    """The causal mask of a right-padded batch (tril & key < length) runs causal_attention with
    seqlens_k, with PyTorch's meaning on every real row; a left-padded one goes to PyTorch."""
    monkeypatch.setattr(lecture_flash.sdpa, "_SAID", set())
    torch.manual_seed(11)
    q, k, v = (rand(2, 2, 9, 8, dtype=torch.float32, device=device) for _ in range(3))
    lengths = torch.tensor([6, 9][2 - batch:], device=device)
    tril = torch.ones(9, 9, dtype=torch.bool, device=device).tril()
    mask = (tril & (torch.arange(9, device=device) < lengths[:, None, None]))[:, None]
    seen = []
    real = lecture_flash.sdpa.causal_attention
    monkeypatch.setattr(lecture_flash.sdpa, "causal_attention",
                        lambda *a, **kw: (seen.append(kw["seqlens_k"]), real(*a, **kw))[1])
    got = _lse_free_grads(scaled_dot_product_attention, q, k, v, dict(attn_mask=mask))
    want = _lse_free_grads(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                           dict(attn_mask=mask))
    assert seen and seen[0].tolist() == lengths.expand(2).tolist()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    left_padded = mask.flip(-1).flip(-2)
    with pytest.warns(UserWarning, match="not the causal mask of a right-padded batch"):
        scaled_dot_product_attention(q, k, v, attn_mask=left_padded)


def test_sdpa_entry_can_replace_pytorchs(monkeypatch, device):
    """Monkey-patched in, as nanoGPT-style code would be: the PyTorch paths inside kernels keep
    calling PyTorch's own SDPA (no recursion)."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", scaled_dot_product_attention)
    q, k, v = (rand(1, 2, 9, 8, dtype=torch.float32, device=device) for _ in range(3))
    for backend in ("sdpa", "auto"):
        out = causal_attention(q, k, v, backend=backend)
        torch.testing.assert_close(out, causal_attention_reference(q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, causal_attention_reference(q, k, v))


# Per-row key lengths (seqlens_k) and packed sequences (cu_seqlens_*): the PyTorch paths pad and
# mask; tests/test_flash.py runs the kernel through every backward path.

@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_right_padded_batch_rows_match_each_sequence_alone(backend, dtype, device):
    """The user's story for seqlens_k: sequences of lengths 5 and 9 right-padded to 9 (garbage,
    even NaN, in the padding); each real row equals causal attention over its own sequence."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(30)
    q, k, v = (rand(2, 2, 9, 16, dtype=dtype, device=device) for _ in range(3))
    k[0, :, 5:], v[0, :, 5:] = float("nan"), float("inf")
    lengths = torch.tensor([5, -1, 9, -1], device=device, dtype=torch.int32)[::2]  # strided: read by index
    out = causal_attention(q, k, v, backend=backend, seqlens_k=lengths)
    alone = causal_attention(q[:1, :, :5], k[:1, :, :5], v[:1, :, :5], backend=backend)
    torch.testing.assert_close(out[:1, :, :5], alone)
    torch.testing.assert_close(out[1:], causal_attention(q[1:], k[1:], v[1:], backend=backend))
    assert torch.isfinite(out).all()  # padding rows see only real keys


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
def test_packed_sequences_match_each_sequence_alone(backend, device):
    """Packed documents (lengths 4, 11, 1) give what each gives alone, including Lq < Lk."""
    skip_if_unavailable(backend, device)
    torch.manual_seed(31)
    lq, lk = [4, 11, 1], [6, 11, 3]
    q = rand(sum(lq), 4, 24, dtype=torch.float32, device=device)
    k, v = (rand(sum(lk), 2, 24, dtype=torch.float32, device=device) for _ in range(2))
    cu = [torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), device=device, dtype=torch.int32)
          for n in (lq, lk)]
    out = causal_attention(q, k, v, backend=backend, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1],
                           max_seqlen_q=11, max_seqlen_k=11)
    assert out.shape == q.shape
    for b in range(3):
        rq, rk = slice(int(cu[0][b]), int(cu[0][b + 1])), slice(int(cu[1][b]), int(cu[1][b + 1]))
        alone = causal_attention(*(x[r].transpose(0, 1).unsqueeze(0) for x, r in
                                   ((q, rq), (k, rk), (v, rk))), backend=backend)
        torch.testing.assert_close(out[rq], alone[0].transpose(0, 1), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["lengths", "packed", "packed-window"])
def test_key_lengths_and_packed_sequences(request, backend, dtype, kind, device):
    """Forward and gradients held to the rule, rows that see no key included (zeros)."""
    known_sdpa_cpu_bf16(request, backend, dtype, device)
    torch.manual_seed(32)
    if kind == "lengths":
        q = rand(3, 2, 20, 16, dtype=dtype, device=device)
        k, v = (rand(3, 1, 26, 16, dtype=dtype, device=device) for _ in range(2))
        rows = dict(seqlens_k=torch.tensor([26, 7, 0], device=device))
    else:
        q = rand(30, 2, 16, dtype=dtype, device=device)
        k, v = (rand(25, 1, 16, dtype=dtype, device=device) for _ in range(2))
        rows = dict(cu_seqlens_q=torch.tensor([0, 3, 21, 30], device=device),
                    cu_seqlens_k=torch.tensor([0, 8, 18, 25], device=device))
    got = check_against_oracle(q, k, v, backend, rows=rows,
                               window=(4, 0) if kind == "packed-window" else None)
    empty = got[0][2] if kind == "lengths" else got[0][21:23]  # no key: 7 keys for 9 queries
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.fixture(params=["as-one", "padded"])
def packed_path(request, monkeypatch):
    """Both ways the PyTorch paths attend packed sequences: as one sequence under a
    block-diagonal mask, or padded into a batch (lecture_flash.dispatch.PACKED_AS_ONE picks by size)."""
    import lecture_flash
    monkeypatch.setattr(lecture_flash.dispatch, "PACKED_AS_ONE", (10**9, 10**12) if request.param == "as-one" else (0, 0))
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, (4, 0)], ids=["causal", "window"])
def test_both_packed_paths_agree_with_the_oracle(packed_path, backend, window, device):
    """Forward, lse and gradients of documents with Lq < Lk, Lq > Lk (rows that see no key) and an
    empty key sequence, on each path."""
    torch.manual_seed(33)
    lq, lk = [3, 9, 5, 2], [6, 4, 5, 0]
    q = rand(sum(lq), 2, 16, dtype=torch.float32, device=device)
    k, v = (rand(sum(lk), 1, 16, dtype=torch.float32, device=device) for _ in range(2))
    cu = [torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), device=device, dtype=torch.int32)
          for n in (lq, lk)]
    rows = dict(cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])
    check_against_oracle(q, k, v, backend, rows=rows, window=window)
    out, lse = causal_attention(q, k, v, backend=backend, return_lse=True, window=window, **rows)
    ref, ref_lse = causal_attention_reference(q.double(), k.double(), v.double(), return_lse=True,
                                              window=window, **rows)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    # Rows that see no key: document 2's first five (9 queries, 4 keys), document 4's (no keys).
    assert torch.isinf(lse[:, 3:8]).all() and torch.isinf(lse[:, 17:]).all()
    assert torch.equal(out[3:8], torch.zeros_like(out[3:8])) and not out[17:].any()


def test_block_diagonal_masks_empty_rows_and_reuse():
    """block_diagonal_mask's empty rows are the mask's own, and a mask is reused only for the
    same cu_seqlens tensors, unchanged."""
    from lecture_flash.packing import block_diagonal_mask
    torch.manual_seed(34)
    for _ in range(20):
        lq, lk = torch.randint(0, 7, (4,)), torch.randint(0, 7, (4,))
        cu_q, cu_k = (torch.cat([torch.zeros(1, dtype=torch.int32), n.cumsum(0).int()]) for n in (lq, lk))
        for left in (None, 0, 2):
            mask, empty = block_diagonal_mask(cu_q, cu_k, int(lq.sum()), int(lk.sum()), left)
            want = ~mask.any(-1, keepdim=True)
            # (on a CPU, False where no query is empty: the callers skip their patching)
            assert torch.equal(empty, want) if want.any() else empty is False
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    first = block_diagonal_mask(cu, cu, 5, 5)
    assert block_diagonal_mask(cu, cu, 5, 5) is first
    cu[1] = 2  # written in place: a new mask
    again = block_diagonal_mask(cu, cu, 5, 5)
    assert again is not first and not torch.equal(again[0], first[0])


ROWS_ERRORS = [
    (dict(seqlens_k=[3, 3]), TypeError, "seqlens_k must be a torch.Tensor"),
    (dict(seqlens_k=torch.tensor([3.0, 3.0])), TypeError, "seqlens_k must be an integer tensor"),
    (dict(seqlens_k=torch.tensor([3])), ValueError, r"seqlens_k must have shape \(2,\)"),
    (dict(seqlens_k=torch.tensor([3, 6])), ValueError, r"seqlens_k must lie in \[0, Tk=5\]"),
    (dict(seqlens_k=torch.tensor([3, 3]), cu_seqlens_q=torch.tensor([0, 1])), ValueError,
     "seqlens_k and cu_seqlens"),
    (dict(cu_seqlens_q=torch.tensor([0, 1])), ValueError, "need both cu_seqlens_q and cu_seqlens_k"),
]


@pytest.mark.parametrize("options, error, words", ROWS_ERRORS)
def test_bad_key_lengths_are_named(options, error, words):
    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 5, 8)
    with pytest.raises(error, match=words):
        causal_attention(q, k, k, **options)


PACKED_ERRORS = [
    ((6, 6), dict(cu_seqlens_q=torch.tensor([0, 2, 6]), cu_seqlens_k=torch.tensor([0, 6])),
     ValueError, r"cu_seqlens_k must have shape \(3,\)"),
    ((6, 6), dict(cu_seqlens_q=torch.tensor([0, 2, 5]), cu_seqlens_k=torch.tensor([0, 2, 6])),
     ValueError, r"cu_seqlens_q must rise from 0 to the number of packed rows \(6\)"),
    ((6, 6), dict(cu_seqlens_q=torch.tensor([0, 4, 2]), cu_seqlens_k=torch.tensor([0, 2, 6])),
     ValueError, r"cu_seqlens_q must rise .*smallest step -2"),
    ((6, 6), dict(cu_seqlens_q=torch.tensor([0, 2, 6]), cu_seqlens_k=torch.tensor([0, 2, 6]),
                  max_seqlen_q=3), ValueError, r"max_seqlen_q=3 is less than the longest sequence \(4\)"),
    ((6, 6), dict(cu_seqlens_q=torch.tensor([0, 2, 6]), cu_seqlens_k=torch.tensor([0, 2, 6]),
                  layout="bthd"), ValueError, "leave layout at 'bhtd'"),
    ((6, 6), dict(cu_seqlens_q=torch.tensor([0, 2, 6]), cu_seqlens_k=torch.tensor([0, 2, 6]),
                  max_seqlen_k=2.5), TypeError, "max_seqlen_k must be a non-negative int"),
]


@pytest.mark.parametrize("totals, options, error, words", PACKED_ERRORS)
def test_bad_packed_sequences_are_named(totals, options, error, words):
    q, k = torch.randn(totals[0], 2, 8), torch.randn(totals[1], 1, 8)
    with pytest.raises(error, match=words):
        causal_attention(q, k, k, **options)


def test_packed_sequences_need_three_dimensional_inputs():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"with cu_seqlens, q must be 3-D \(total, heads, D\)"):
        causal_attention(q, q, q, cu_seqlens_q=torch.tensor([0, 6]), cu_seqlens_k=torch.tensor([0, 6]))
