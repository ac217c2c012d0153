"""The tolerance rule every backend is held to, in the tests and in the benchmark.

FlashAttention's rule: a result's error against a float64 oracle may be at most twice the error
of PyTorch's own math attention run in the same (low) precision, plus a small absolute slack.
It holds for the output and for each gradient, and it scales with the dtype without per-dtype
magic numbers.

    failures = rule_failures([out], [oracle_out], [pytorch_out], names=("out",))
    assert_by_rule(got, ref64, low)       # raises AssertionError saying what differed, by how much
"""
import torch

FACTOR = 2.0
SLACK = 1e-5


def max_err(a, b):
    """max |a - b|, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def rule_failures(got, ref64, low, names=("out", "dq", "dk", "dv"), factor=FACTOR):
    """One line per result that breaks the rule. got, low: lists of tensors (ours, PyTorch's
    in the same precision); ref64: the float64 truth for each."""
    failures = []
    for name, g, r, l in zip(names, got, ref64, low):
        if not torch.isfinite(g).all():
            failures.append(f"{name}: non-finite values")
            continue
        err, base = max_err(g, r), max_err(l, r)
        if err > factor * base + SLACK:
            failures.append(f"{name}: max|err| {err:.3e} > {factor:g} x PyTorch's own {base:.3e} "
                            f"+ {SLACK:g}")
    return failures


def assert_by_rule(got, ref64, low, names=("out", "dq", "dk", "dv"), factor=FACTOR):
    """rule_failures, as an assertion whose message lists every failure."""
    failures = rule_failures(got, ref64, low, names, factor)
    assert not failures, "; ".join(failures)
