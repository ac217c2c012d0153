"""The oracle itself, and the argument checks every backend shares."""
import re

import pytest
import torch

from lecture_flash.gpt.lecture import Head
from lecture_flash import available_backends, causal_attention
from lecture_flash.reference import causal_attention_reference, causal_mask


def test_causal_mask_is_bottom_right_aligned():
    assert causal_mask(4, 4).equal(torch.ones(4, 4).tril().bool())
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True] * 5]
    assert causal_mask(1, 6).all()


@pytest.mark.parametrize("T", [1, 7, 32])
@pytest.mark.parametrize("scale_by", ["head_size", "n_embd"])
def test_oracle_matches_the_lecture_per_head_loop(T, scale_by):
    torch.manual_seed(T)
    n_embd, n_head, block = 48, 4, 32
    hs = n_embd // n_head
    heads = [Head(n_embd, hs, block, 0.0, scale_by).double() for _ in range(n_head)]
    x = torch.randn(3, T, n_embd, dtype=torch.float64)
    lecture = torch.cat([h(x) for h in heads], dim=-1)  # (B, T, n_embd)
    q, k, v = (torch.stack([getattr(h, name)(x) for h in heads], dim=1) for name in ("query", "key", "value"))
    scale = (hs if scale_by == "head_size" else n_embd) ** -0.5
    ours = causal_attention_reference(q, k, v, scale=scale).transpose(1, 2).reshape(3, T, n_embd)
    torch.testing.assert_close(ours, lecture, rtol=1e-12, atol=1e-12)


def test_oracle_computes_in_float32_for_low_precision():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    exact = causal_attention_reference(q, k, v)
    low = causal_attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    upcast = causal_attention_reference(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(low, upcast.bfloat16(), rtol=0, atol=0)  # rounded once, at the end
    assert (low.float() - exact).abs().max() < 0.05


def test_dropout_mask_is_applied_exactly():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 8, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(1, 1, 5, 5) > 0.5
    out = causal_attention_reference(q, k, v, dropout_p=0.5, dropout_mask=keep)
    p = torch.softmax((q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~causal_mask(5, 5), float("-inf")), -1)
    torch.testing.assert_close(out, (p * keep * 2) @ v)


BAD = [
    (dict(q=torch.zeros(2, 3)), ValueError, "q must be 4-D"),
    (dict(k=torch.zeros(2, 9, 8)), ValueError, "same number of dimensions"),
    (dict(k=torch.zeros(1, 2, 9, 8), v=torch.zeros(1, 2, 9, 8)), ValueError, "batch differs"),
    (dict(k=torch.zeros(2, 3, 9, 8), v=torch.zeros(2, 3, 9, 8)), ValueError, "k's heads (3) must divide q's (2)"),
    (dict(k=torch.zeros(2, 2, 9, 4), v=torch.zeros(2, 2, 9, 4)), ValueError, "head dim differs"),
    (dict(v=torch.zeros(2, 2, 8, 8)), ValueError, "k and v must have the same shape"),
    (dict(q=torch.zeros(2, 2, 10, 8)), ValueError, "Tq=10 > Tk=9"),
    (dict(q=torch.zeros(2, 2, 9, 8, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(q=torch.zeros(2, 2, 9, 8, dtype=torch.long)), TypeError, "floating-point"),
    (dict(q=torch.zeros(2, 2, 9, 8, device="meta")), ValueError, "one device"),
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(scale=True), TypeError, "scale must be a float"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=float("-inf")), ValueError, "scale must be finite"),
    (dict(backend="flash"), ValueError, "backend must be one of"),
    (dict(layout="BTHD"), ValueError, "layout must be 'bhtd' or 'bthd', got 'BTHD'"),
    (dict(window=(4, 2)), ValueError, "with causal=True: a causal window sees no key to the right"),
    (dict(window=(-2, 0)), ValueError, "window must be (left, right) with each >= 0, or -1"),
    (dict(window=4), TypeError, "window must be None or a tuple (left, right) of ints, got 4"),
    (dict(layout="bthd", q=torch.zeros(2, 9, 8), k=torch.zeros(2, 9, 8), v=torch.zeros(2, 9, 8)),
     ValueError, "layout='bthd' needs 4-D (B, T, H, D) tensors; q is (2, 9, 8)"),
]


@pytest.mark.parametrize("change, error, words", BAD, ids=[b[2] for b in BAD])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton", "auto"])
def test_bad_input_names_the_argument(change, error, words, backend):
    args = dict(q=torch.zeros(2, 2, 9, 8), k=torch.zeros(2, 2, 9, 8), v=torch.zeros(2, 2, 9, 8),
                dropout_p=0.0, scale=None, backend=backend)
    args.update(change)
    with pytest.raises(error, match=re.escape(words)):
        causal_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_triton_refuses_what_it_cannot_run():
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' cannot run here: dtype torch.float64"):
        causal_attention(q, q, q, backend="triton")
    q = torch.zeros(1, 1, 4, 300)
    with pytest.raises(ValueError, match="head dim 300 is over 256"):
        causal_attention(q, q, q, backend="triton")


def test_available_backends_lists_the_pure_pytorch_paths():
    names = available_backends("cpu")
    assert names[-2:] == ["sdpa", "reference"]


def test_an_old_triton_is_named_and_auto_falls_back(monkeypatch):
    flash = pytest.importorskip("lecture_flash.flash")
    monkeypatch.setattr(flash, "TOO_OLD", True)
    q = torch.randn(1, 1, 4, 16)
    assert "older than 3.3" in flash.supports(q)
    with pytest.raises(ValueError, match="older than 3.3"):
        causal_attention(q, q, q, backend="triton")
    assert "triton" not in available_backends("cuda")
    assert torch.isfinite(causal_attention(q, q, q)).all()  # auto: a pure-PyTorch path
