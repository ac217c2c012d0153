"""flash-attn's functions (lecture_flash.flash_attn_interface) and the masks they brought into
causal_attention: full attention, windows with a right side, softcapping and attention sinks.

The oracle here is written from flash-attn's documented semantics alone (float64, explicit
loops over the mask's definition), independent of kernels/reference.py; PyTorch's math in the
inputs' own dtype is the low-precision baseline of the tolerance rule. The Triton kernel runs
under the interpreter on a CPU (auto is pointed at it), and on a GPU when there is one.
"""
import pytest
import torch

import lecture_flash
from lecture_flash import causal_attention, causal_attention_reference, dispatch, flash
from lecture_flash import flash_attn_interface as fa
from lecture_flash.testing import assert_by_rule

ROUTES = ["triton", "sdpa", "reference"]


def fa_oracle(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, scale=None, sinks=None,
              keep=None, dropout_p=0.0):
    """flash-attn's attention as its docstring defines it, in q's dtype: q (B, Tq, H, D), k, v
    (B, Tk, Hk, D). Query i sees key j iff j <= i + Tk - Tq + right and j >= i + Tk - Tq - left
    (a bound of -1 absent; causal: right = 0). Returns (out (B, Tq, H, D), lse (B, H, Tq),
    probs (B, H, Tq, Tk))."""
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(Tq).view(-1, 1) + Tk - Tq
    j = torch.arange(Tk).view(1, -1)
    seen = torch.ones(Tq, Tk, dtype=torch.bool)
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (D ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~seen.to(q.device), float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, -1, 1, 1).expand(B, H, Tq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    if sinks is not None:
        p = p[..., :-1]
    probs = p
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse, probs


def _grads(fn, inputs, do):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out, inputs, do)
    return [out.detach(), *grads]


@pytest.fixture
def route(request, monkeypatch):
    """Point backend="auto" (what the interface calls) at one route."""
    name = request.param
    if name == "triton" and "triton" not in lecture_flash.available_backends():
        pytest.skip("triton cannot run here")
    monkeypatch.setattr(dispatch, "_auto_backend", lambda q, measure: name)
    return name


def _inputs(B=1, Tq=24, Tk=40, H=2, Hk=1, D=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, Tk, Hk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Tk, Hk, D, generator=g).to(device, dtype)
    return q, k, v


MASKS = [  # (causal, window_size)
    (True, (-1, -1)), (False, (-1, -1)), (True, (7, 0)), (True, (5, 9)), (False, (6, 4)),
    (False, (-1, 3)), (False, (9, -1)), (False, (0, 0)),
]


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("causal,window_size", MASKS)
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_flash_attn_func_matches_flash_attn_semantics(route, causal, window_size, softcap, device):
    """Output, dQ, dK, dV of flash_attn_func under every mask flash-attn defines, with grouped
    heads, Tq < Tk and softcapping, held to the rule against the float64 oracle."""
    if route == "triton" and device.type == "cpu" and softcap and window_size[0] == -1:
        pytest.skip("the interpreter is slow: softcap runs under windows here")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = _inputs(H=4, Hk=2, dtype=dtype, device=device)
    do = torch.randn(q.shape, dtype=dtype, device=device)
    opts = dict(causal=causal, window_size=window_size, softcap=softcap)
    got = _grads(lambda a, b, c: fa.flash_attn_func(a, b, c, **opts), (q, k, v), do)
    ref = _grads(lambda a, b, c: fa_oracle(a, b, c, **opts), [x.double() for x in (q, k, v)],
                 do.double())
    low = _grads(lambda a, b, c: fa_oracle(a, b, c, **opts), (q, k, v), do)
    assert got[0].shape == q.shape
    assert_by_rule(got, ref, low)


@pytest.mark.parametrize("route", ["sdpa", "triton"], indirect=True)
def test_full_attention_takes_more_queries_than_keys(route, device):
    q, k, v = _inputs(Tq=33, Tk=17, device=device)
    do = torch.randn(q.shape, device=device)
    got = _grads(lambda a, b, c: fa.flash_attn_func(a, b, c), (q, k, v), do)
    ref = _grads(fa_oracle, [x.double() for x in (q, k, v)], do.double())
    low = _grads(fa_oracle, (q, k, v), do)
    assert_by_rule(got, ref, low)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        fa.flash_attn_func(q, k, v, causal=True)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
def test_return_attn_probs_and_lse(route, device):
    q, k, v = _inputs(device=device)
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=False, window_size=(5, 3),
                                         return_attn_probs=True)
    want, want_lse, want_probs = fa_oracle(*(x.double() for x in (q, k, v)), window_size=(5, 3))
    assert lse.shape == (1, 2, 24) and lse.dtype == torch.float32
    assert probs.shape == (1, 2, 24, 40)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=0)
    torch.testing.assert_close(probs.double(), want_probs, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)


def test_packed_forms_are_views_of_the_same_call(device):
    q, k, v = _inputs(Tq=20, Tk=20, H=2, Hk=2, device=device)
    want = fa.flash_attn_func(q, k, v, causal=True, window_size=(4, 0))
    qkv = torch.stack([q, k, v], dim=2)
    assert torch.equal(fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(4, 0)), want)
    assert torch.equal(fa.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), causal=True,
                                                   window_size=(4, 0)), want)
    cu = torch.tensor([0, 20], dtype=torch.int32, device=device)
    packed = fa.flash_attn_varlen_qkvpacked_func(qkv[0], cu, 20, causal=True, window_size=(4, 0))
    torch.testing.assert_close(packed, want[0], atol=1e-6, rtol=0)
    packed = fa.flash_attn_varlen_kvpacked_func(q[0], torch.stack([k, v], dim=2)[0], cu, cu, 20, 20,
                                                causal=True, window_size=(4, 0))
    torch.testing.assert_close(packed, want[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"qkv must be \(B, T, 3, H, D\)"):
        fa.flash_attn_qkvpacked_func(q)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("causal,window_size,softcap", [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0),
                                                        (True, (3, 0), 0.0), (False, (4, 2), 2.0)])
def test_varlen_is_each_sequence_alone(route, causal, window_size, softcap, device):
    """modded-nanogpt's call: packed documents of unequal lengths (queries and keys apart), each
    attended alone, forward and backward; lse (H, total_q)."""
    lq, lk = [5, 17, 1, 9], [8, 17, 6, 9]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), 4, 16, generator=g).to(device)
    k, v = (torch.randn(sum(lk), 2, 16, generator=g).to(device) for _ in range(2))
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=device)
    opts = dict(causal=causal, window_size=window_size, softcap=softcap)
    do = torch.randn(q.shape, device=device)

    def run(a, b, c):
        return fa.flash_attn_varlen_func(a, b, c, cu_q, cu_k, max(lq), max(lk), **opts)

    def alone(a, b, c):
        outs = [fa_oracle(a[None, cu_q[i]:cu_q[i + 1]], b[None, cu_k[i]:cu_k[i + 1]],
                          c[None, cu_k[i]:cu_k[i + 1]], **opts)[0][0] for i in range(len(lq))]
        return torch.cat(outs)
    got = _grads(run, (q, k, v), do)
    assert_by_rule(got, _grads(alone, [x.double() for x in (q, k, v)], do.double()),
                   _grads(alone, (q, k, v), do))
    _, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                          return_attn_probs=True, **opts)
    want = torch.cat([fa_oracle(q[None, cu_q[i]:cu_q[i + 1]].double(),
                                k[None, cu_k[i]:cu_k[i + 1]].double(),
                                v[None, cu_k[i]:cu_k[i + 1]].double(), **opts)[1][0]
                      for i in range(len(lq))], dim=1)
    assert lse.shape == (4, sum(lq))
    torch.testing.assert_close(lse.double(), want, atol=2e-5, rtol=0)


def _rotary_oracle(x, pos, cos, sin, interleaved):
    """Rotary embedding by its definition, float64: x (B, T, H, D), pos (B, T)."""
    x = x.double()
    r = 2 * cos.shape[1]
    c, s = cos.double()[pos].unsqueeze(2), sin.double()[pos].unsqueeze(2)
    if interleaved:
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        y = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    else:
        a, b = x[..., :r // 2], x[..., r // 2:r]
        y = torch.cat([a * c - b * s, a * s + b * c], -1)
    return torch.cat([y, x[..., r:]], -1)


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("causal,window_size", [(True, (-1, -1)), (True, (4, 0)), (False, (-1, -1)),
                                                (False, (3, 2))])
@pytest.mark.parametrize("rotary", [None, "interleaved", "halves"])
def test_with_kvcache_appends_in_place_and_attends(route, causal, window_size, rotary, device):
    """nanochat's decode call: each row's new keys written at its own cache_seqlens (unequal),
    in place; the queries the last positions of each row; rotary embedding of q and the new k
    at their positions; grouped heads; lse."""
    if route == "triton" and device.type == "cpu" and rotary == "halves" and window_size[0] != -1:
        pytest.skip("the interpreter is slow: one rotary form per window here")
    B, S, H, Hk, D, T_new = 3, 32, 4, 2, 16, 2
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(B, S, Hk, D, generator=g).to(device)
    v_cache = torch.randn(B, S, Hk, D, generator=g).to(device)
    k_cache[:, 20:] = float("nan")  # slots past every row's keys: never read
    v_cache[:, 20:] = float("nan")
    q = torch.randn(B, T_new, H, D, generator=g).to(device)
    k, v = (torch.randn(B, T_new, Hk, D, generator=g).to(device) for _ in range(2))
    seqlens = torch.tensor([3, 11, 17], dtype=torch.int32, device=device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    extra = {}
    if rotary is not None:
        cos, sin = torch.randn(S, 6, generator=g).to(device), torch.randn(S, 6, generator=g).to(device)
        extra = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "interleaved")
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                          causal=causal, window_size=window_size,
                                          return_softmax_lse=True, **extra)
    for b in range(B):
        L = int(seqlens[b])
        pos = torch.arange(L, L + T_new, device=device).view(1, -1)
        kb, qb = k[b:b + 1].double(), q[b:b + 1].double()
        if rotary is not None:
            kb = _rotary_oracle(k[b:b + 1], pos, cos, sin, rotary == "interleaved")
            qpos = pos if causal or window_size != (-1, -1) else torch.full_like(pos, L)
            qb = _rotary_oracle(q[b:b + 1], qpos, cos, sin, rotary == "interleaved")
        # the cache in place: the new rows at the row's own slots, nothing else touched
        torch.testing.assert_close(k_cache[b, L:L + T_new].double(), kb[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(v_cache[b, L:L + T_new], v[b])
        assert torch.equal(k_cache[b, :L], before_k[b, :L])
        assert torch.equal(v_cache[b, L + T_new:].isnan(), before_v[b, L + T_new:].isnan())
        keys = torch.cat([before_k[b:b + 1, :L].double(), kb], dim=1)
        values = torch.cat([before_v[b:b + 1, :L], v[b:b + 1]], dim=1).double()
        want, want_lse, _ = fa_oracle(qb, keys, values, causal, window_size)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=2e-5, rtol=0)


@pytest.mark.parametrize("route", ["sdpa", "triton"], indirect=True)
def test_with_kvcache_batch_idx_leftpad_splits_and_no_new_keys(route, device):
    B, S, H, D = 2, 24, 2, 16
    g = torch.Generator().manual_seed(6)
    k_cache, v_cache = (torch.randn(3, S, H, D, generator=g).to(device) for _ in range(2))
    q = torch.randn(B, 1, H, D, generator=g).to(device)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    seqlens = torch.tensor([9, 20], dtype=torch.int32, device=device)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                     cache_batch_idx=idx, causal=True, num_splits=3)
    for b in range(B):
        L, r = int(seqlens[b]), int(idx[b])
        want = fa_oracle(q[b:b + 1].double(), k_cache[r:r + 1, :L].double(),
                         v_cache[r:r + 1, :L].double(), causal=True)[0]
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=0)
    pad = torch.tensor([4, 0], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="pass cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
    k_cache, v_cache = k_cache[:2], v_cache[:2]
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=pad,
                                     causal=True)
    want = fa_oracle(q[:1].double(), k_cache[:1, 4:9].double(), v_cache[:1, 4:9].double(),
                     causal=True)[0]
    torch.testing.assert_close(out[:1].double(), want, atol=2e-5, rtol=0)
    # an int cache_seqlens: every row at that position
    out = fa.flash_attn_with_kvcache(q, k_cache[:2], v_cache[:2], cache_seqlens=7, causal=True)
    want = fa_oracle(q.double(), k_cache[:2, :7].double(), v_cache[:2, :7].double(), causal=True)[0]
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)


def test_what_we_do_not_implement_is_refused_by_name(device):
    q, k, v = _inputs(device=device)
    slopes = torch.ones(2, device=device)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fa.flash_attn_func(q, k, v, alibi_slopes=slopes)
    cu = torch.tensor([0, 24], dtype=torch.int32, device=device)
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_varlen_func(q[0], k[0, :24], v[0, :24], cu, cu, 24, 24,
                                  block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=3, block_table=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="cache_seqlens is needed"):
        fa.flash_attn_with_kvcache(q, k, v, k=k[:, :1], v=v[:, :1])
    if device.type == "cpu":
        with pytest.raises(ValueError, match="pass the cache's 40 slots"):
            fa.flash_attn_with_kvcache(q[:, :1], k.clone(), v.clone(), k=k[:, :2], v=v[:, :2],
                                       cache_seqlens=39)


def test_compiled_fullgraph(device):
    """torch.compile(fullgraph=True) through flash_attn_func, the varlen and the kvcache
    functions (the PyTorch paths here; on a GPU the kernels' custom ops)."""
    q, k, v = _inputs(Tq=16, Tk=16, device=device)
    f = torch.compile(lambda a, b, c: fa.flash_attn_func(a, b, c, causal=False, window_size=(3, 2),
                                                         softcap=2.0), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), fa.flash_attn_func(q, k, v, window_size=(3, 2), softcap=2.0))
    cu = torch.tensor([0, 6, 16], dtype=torch.int32, device=device)
    f = torch.compile(lambda a, b, c: fa.flash_attn_varlen_func(a, b, c, cu, cu, 10, 10, causal=True,
                                                                window_size=(2, 0)), fullgraph=True)
    torch.testing.assert_close(f(q[0], k[0], v[0]),
                               fa.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 10, 10,
                                                         causal=True, window_size=(2, 0)))


# ------------------------------------------------------------------------------------------------
# The new masks, softcap and sinks through causal_attention, every route, dropout, rows
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [dict(sinks=True), dict(sinks=True, softcap=2.0, window=(5, 0)),
                                   dict(causal=False, window=(4, 6), sinks=True)])
def test_sinks_join_the_denominator_with_their_gradient(route, dtype, extra, device):
    """gpt-oss's sinks: output, lse and every gradient (dsinks included) against the oracle."""
    if route == "triton" and "triton" not in lecture_flash.available_backends(device):
        pytest.skip("triton cannot run here")
    torch.manual_seed(2)
    extra = dict(extra)
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 20 if i == 0 else 30, 16, device=device,
                           dtype=dtype) for i in range(3))
    sinks = torch.randn(4, device=device)
    extra["sinks"] = sinks
    do = torch.randn(q.shape, device=device, dtype=dtype)

    def run(fn, a, b, c, s):
        args = dict(extra, sinks=s)
        out, lse = fn(a, b, c, return_lse=True, **args)
        return out, lse

    def grads(fn, inputs, d):
        inputs = [x.detach().requires_grad_() for x in inputs]
        out, lse = run(fn, *inputs)
        gs = torch.autograd.grad((out, lse), inputs, (d, torch.ones_like(lse)))
        return [out.detach(), lse.detach(), *gs]
    got = grads(lambda *a, **kw: causal_attention(*a, backend=route, **kw), (q, k, v, sinks), do)
    ref = grads(causal_attention_reference, [x.double() for x in (q, k, v, sinks)], do.double())
    low = grads(_low, (q, k, v, sinks), do)
    assert_by_rule(got, ref, low, names=("out", "lse", "dq", "dk", "dv", "dsinks"))


def _low(q, k, v, return_lse, sinks, causal=True, window=None, softcap=0.0):
    """fa_oracle in the inputs' dtype on (B, H, T, D) tensors: the rule's baseline."""
    window = window or (-1, -1)
    out, lse, _ = fa_oracle(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal,
                            window, softcap, sinks=sinks.to(q.dtype))
    return out.transpose(1, 2), lse.float()


@pytest.mark.parametrize("kind", ["lengths", "packed", "decode"])
@pytest.mark.parametrize("route", ROUTES)
def test_new_masks_under_rows_and_decode(kind, route, device):
    """Full attention and windows with a right side under per-row key lengths, packed rows and a
    decode cache, every route, against the reference's float64 arithmetic."""
    if route == "triton" and "triton" not in lecture_flash.available_backends(device):
        pytest.skip("triton cannot run here")
    torch.manual_seed(4)
    for causal, window, softcap in [(False, None, 0.0), (False, (3, 5), 1.5), (True, (4, 0), 0.0)]:
        if kind == "decode":
            q = torch.randn(2, 4, 3, 16, device=device)
            kc, vc = (torch.randn(2, 2, 40, 16, device=device) for _ in range(2))
            lengths = torch.tensor([9, 33], device=device)
            got = lecture_flash.decode_attention(q, kc, vc, lengths, backend=route, causal=causal,
                                                 window=window, softcap=softcap)
            for b in range(2):
                L = int(lengths[b])
                want = causal_attention_reference(q[b:b + 1].double(), kc[b:b + 1, :, :L].double(),
                                                  vc[b:b + 1, :, :L].double(), causal=causal,
                                                  window=window, softcap=softcap)
                torch.testing.assert_close(got[b:b + 1].double(), want, atol=2e-5, rtol=0)
            continue
        if kind == "lengths":
            q = torch.randn(2, 2, 12, 16, device=device, requires_grad=True)
            k, v = (torch.randn(2, 2, 20, 16, device=device, requires_grad=True) for _ in range(2))
            rows = dict(seqlens_k=torch.tensor([20, 13], device=device))
        else:
            q = torch.randn(30, 2, 16, device=device, requires_grad=True)
            k, v = (torch.randn(34, 2, 16, device=device, requires_grad=True) for _ in range(2))
            cu_q = torch.tensor([0, 10, 30], dtype=torch.int32, device=device)
            cu_k = torch.tensor([0, 14, 34], dtype=torch.int32, device=device)
            rows = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=20)
        opts = dict(causal=causal, window=window, softcap=softcap, **rows)
        out = causal_attention(q, k, v, backend=route, **opts)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        want = causal_attention_reference(q64, k64, v64, **opts)
        wants = torch.autograd.grad(want.square().sum(), (q64, k64, v64))
        for g, w in zip((out, *grads), (want, *wants)):
            torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=0)


@pytest.mark.parametrize("causal,window", [(False, None), (False, (6, 4))])
def test_triton_dropout_under_the_new_masks(causal, window, device):
    """Dropout with full attention and a two-sided window: the kernels' own keep-mask given to
    the oracle, forward and backward."""
    if "triton" not in lecture_flash.available_backends(device):
        pytest.skip("triton cannot run here")
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 2, 20 if i == 0 else 28, 16, device=device) for i in range(3))
    p = 0.3
    do = torch.randn(q.shape, device=device)

    def run(a, b, c):
        torch.manual_seed(123)
        return causal_attention(a, b, c, dropout_p=p, backend="triton", causal=causal, window=window)
    torch.manual_seed(123)
    keep = flash.dropout_keep_mask(flash.draw_seed(device), 1, 2, 20, 28, p)
    got = _grads(run, (q, k, v), do)
    ref = _grads(lambda a, b, c: causal_attention_reference(
        a, b, c, dropout_p=p, dropout_mask=keep, causal=causal, window=window),
        [x.double() for x in (q, k, v)], do.double())
    low = _grads(lambda a, b, c: causal_attention_reference(
        a, b, c, dropout_p=p, dropout_mask=keep, causal=causal, window=window), (q, k, v), do)
    assert_by_rule(got, ref, low)


def test_bad_masks_are_refused_by_name(device):
    q = torch.randn(1, 1, 4, 8, device=device)
    with pytest.raises(ValueError, match="causal=True"):
        causal_attention(q, q, q, window=(3, 2))
    with pytest.raises(ValueError, match="window must be"):
        causal_attention(q, q, q, causal=False, window=(-2, 1))
    with pytest.raises(ValueError, match="softcap"):
        causal_attention(q, q, q, softcap=-1.0)
    with pytest.raises(ValueError, match="sinks must be"):
        causal_attention(q, q, q, sinks=torch.zeros(3, device=device))


def test_with_kvcache_compiled_fullgraph(device):
    """A decode step through flash_attn_with_kvcache compiled whole: the append in place and the
    attention in one graph."""
    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = (torch.randn(2, 16, 2, 8, generator=g).to(device) for _ in range(2))
    q, k, v = (torch.randn(2, 1, 2, 8, generator=g).to(device) for _ in range(3))
    seqlens = torch.tensor([3, 9], dtype=torch.int32, device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    want = fa.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=seqlens, causal=True,
                                      window_size=(4, 0))
    step = torch.compile(lambda *a: fa.flash_attn_with_kvcache(
        *a[:3], k=a[3], v=a[4], cache_seqlens=a[5], causal=True, window_size=(4, 0)), fullgraph=True)
    torch.testing.assert_close(step(q, k_cache, v_cache, k, v, seqlens), want)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


@pytest.mark.gpu
def test_with_kvcache_decode_step_in_a_cuda_graph(device):
    """nanochat's decode step captured once and replayed as each row's position moves: the
    append lands at the new positions and the output equals an eager call's. (Its CPU twin:
    test_with_kvcache_appends_in_place_and_attends.)"""
    g = torch.Generator().manual_seed(8)
    k_cache, v_cache = (torch.randn(2, 256, 2, 64, generator=g).to(device, torch.bfloat16)
                        for _ in range(2))
    q, k, v = (torch.randn(2, 1, 4 if i == 0 else 2, 64, generator=g).to(device, torch.bfloat16)
               for i in range(3))
    seqlens = torch.tensor([3, 40], dtype=torch.int32, device=device)

    def step():
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seqlens,
                                          causal=True, window_size=(64, 0))
    step()  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lengths in ([10, 100], [200, 7]):
        seqlens.copy_(torch.tensor(lengths, device=device))
        graph.replay()
        replayed = out.clone()
        kc, vc = k_cache.clone(), v_cache.clone()
        for b, L in enumerate(lengths):
            assert torch.equal(k_cache[b, L], k[b, 0]) and torch.equal(v_cache[b, L], v[b, 0])
        torch.testing.assert_close(replayed, step(), rtol=0, atol=0)
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)  # the same slots again
