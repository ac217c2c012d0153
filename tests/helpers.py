"""The tolerance rule of design.md, and a check that applies it to forward and gradients.

A backend's error against the float64 oracle may be at most twice the error of PyTorch's own
math attention run in the backend's precision, plus a small absolute slack. The rule holds for
the output and each of dq, dk, dv, and it scales with dtype without per-dtype magic numbers.
"""
import torch

from kernels import causal_attention
from kernels.reference import causal_attention_reference, naive_causal_attention

SLACK = 1e-5


def _grads(fn, inputs, do):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, inputs, do.to(out.dtype))]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_by_rule(got, ref64, low, names=("out", "dq", "dk", "dv"), factor=2.0):
    """got/low: lists of tensors; ref64: float64 truth. Message says what differed by how much."""
    failures = []
    for name, g, r, l in zip(names, got, ref64, low):
        if not torch.isfinite(g).all():
            failures.append(f"{name}: non-finite values")
            continue
        err, base = max_err(g, r), max_err(l, r)
        if err > factor * base + SLACK:
            failures.append(f"{name}: max|err| {err:.3e} > {factor} x PyTorch's own {base:.3e} + {SLACK:g}")
    assert not failures, "; ".join(failures)


def check_against_oracle(q, k, v, backend, scale=None, dropout_p=0.0, keep=None, run=None):
    """Run `backend` (or `run(q, k, v)`) on q, k, v and hold output and grads to the rule."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    if run is None:
        def run(q_, k_, v_):
            return causal_attention(q_, k_, v_, scale=scale, dropout_p=dropout_p, backend=backend)
    got = _grads(run, (q, k, v), do)
    ref64 = _grads(lambda a, b, c: causal_attention_reference(
        a, b, c, scale=scale, dropout_p=dropout_p, dropout_mask=keep), [x.double() for x in (q, k, v)], do.double())
    low = _grads(lambda a, b, c: naive_causal_attention(a, b, c, scale, dropout_p, keep), (q, k, v), do)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
    assert_by_rule(got, ref64, low)
    return got
