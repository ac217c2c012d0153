"""backend="auto"'s measured choice (kernels/auto.py): the chooser with injected timings, and
causal_attention routing each class of calls to the route measured fastest.

On CPU the measuring is switched on by hand (it runs only on CUDA in use), with the Triton
kernel under the interpreter and PyTorch's CPU SDPA as the candidates; timings are injected,
never taken, so no test depends on speed.
"""
import pytest
import torch

import lecture_flash
from helpers import check_against_oracle
from lecture_flash import auto, available_backends, causal_attention

needs_triton = pytest.mark.skipif("triton" not in available_backends(),
                                  reason="triton is not installed on this platform")


def test_class_of_rounds_counts_up_to_powers_of_two():
    q = torch.empty(64, 6, 256, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(64, 3, 300, 64, device="meta", dtype=torch.bfloat16)  # groups of 2
    assert auto.class_of(q, q, 0.0, True) == ("meta", "bfloat16", 64, 1, 512, 256, 256, True, False, True)
    assert auto.class_of(q, k, 0.2, False) == ("meta", "bfloat16", 64, 2, 512, 256, 512, False, True, False)
    one = torch.empty(1, 1, 1, 8, device="meta")
    assert auto.class_of(one, one, 0.0, False)[4:7] == (1, 1, 1)


def test_chooser_times_each_route_once_per_class_and_keeps_the_fastest():
    timed = []
    ms = {"a": 3.0, "b": 1.0, "c": 2.0}

    def timer(fn):
        route = fn()
        timed.append(route)
        return ms[route]

    chooser = auto.Chooser(timer)
    passes = {route: (lambda r=route: r) for route in ms}
    assert chooser.choose("cls", passes) == "b"
    assert chooser.choose("cls", passes) == "b"  # remembered: nothing timed again
    assert timed == ["a", "b", "c"]
    ms["b"] = 3.0  # a tie between a and b: the earlier route wins
    assert chooser.choose("other", passes) == "c"
    ms["c"] = 3.0
    assert chooser.choose("third", passes) == "a"
    [row] = [r for r in chooser.report() if r["device"] == "c"]  # the class's parts, zipped
    assert row["chosen"] == "b" and row["timed_ms"] == {"a": 3.0, "b": 1.0, "c": 2.0}


def test_chooser_leaves_out_what_cannot_run_and_says_why():
    def cannot(message):
        def run():
            raise RuntimeError(message)
        return run

    chooser = auto.Chooser(lambda fn: 1.0)
    passes = {"fast-but-absent": cannot("No available kernel.\nmore detail"), "slow": lambda: None}
    assert chooser.choose("cls", passes) == "slow"
    assert chooser.report()[0]["left_out"] == {"fast-but-absent": "No available kernel."}
    with pytest.raises(RuntimeError, match="no attention path could run"):
        chooser.choose("none", {"x": cannot("no")})
    with pytest.raises(TypeError):  # a bug in a route is not a route that cannot run
        chooser.choose("bug", {"x": lambda: None + 1})


def test_chooser_leaves_the_random_state_as_it_found_it():
    """Timing a route with dropout draws random numbers; the caller's stream must not move."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    auto.Chooser(lambda fn: (fn(), 1.0)[1]).choose("cls", {"draws": lambda: torch.rand(100)})
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture
def measured(monkeypatch):
    """Measuring switched on for this machine's device, with injected timings by route:
    set ms[(route, needs_grad)]; returns (ms, routes timed, routes run)."""
    ran, timed, ms = [], [], {}
    real_run = lecture_flash.dispatch._run
    monkeypatch.setattr(lecture_flash.dispatch, "_run", lambda route, *a, **kw: (ran.append(route), real_run(route, *a, **kw))[1])

    def timer(fn):
        ran.clear()
        fn()
        timed.append(ran[0])
        return ms[(ran[0], torch.is_grad_enabled())]

    monkeypatch.setattr(auto, "CHOOSER", auto.Chooser(timer))
    monkeypatch.setattr(auto, "MEASURE", True)
    monkeypatch.setattr(auto, "can_measure", lambda q: True)
    monkeypatch.setattr(lecture_flash.dispatch, "_auto_backend", lambda q, measure: "measure" if measure else "triton")
    monkeypatch.setattr(lecture_flash.dispatch, "_RESOLVED", {})
    monkeypatch.setattr(lecture_flash.dispatch, "_MEASURED", {})
    return ms, timed, ran


def _times(ms, needs_grad, **by_route):
    for route in auto.ROUTES:
        ms[(route, needs_grad)] = by_route.get(route, 9.0)


@needs_triton
def test_auto_runs_each_class_by_the_route_measured_fastest(measured, device):
    """Training (forward+backward) measured fastest on SDPA, inference on Triton: each call
    runs its class's winner, the results hold to the rule, and a class is timed once."""
    ms, timed, ran = measured
    # (The fake timer tells the classes apart by the caller's grad mode.)
    _times(ms, True, triton=2.0, sdpa=1.0)
    _times(ms, False, triton=1.0, sdpa=2.0)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 16, device=device, dtype=torch.bfloat16) for _ in range(3))
    check_against_oracle(q, k, v, "auto")
    assert ran[-1] == "sdpa"  # ran[-1]: the call itself, after its class was timed
    n_timed = len(timed)
    assert n_timed >= 2 and set(timed) <= set(auto.ROUTES)
    check_against_oracle(q, k, v, "auto")
    assert len(timed) == n_timed and ran[-1] == "sdpa"  # the same class: looked up
    with torch.no_grad():
        causal_attention(q, k, v)
    assert ran[-1] == "triton"
    rows = {row["backward"]: row for row in lecture_flash.auto_report()}
    assert rows[True]["chosen"] == "sdpa" and rows[False]["chosen"] == "triton"
    if device.type == "cpu":  # PyTorch has no cuDNN or memory-efficient attention on CPU
        assert {"sdpa-cudnn", "sdpa-efficient"} <= set(rows[True]["left_out"])


@needs_triton
def test_auto_keeps_triton_for_the_kernels_options_and_determinism(measured, device):
    """A call naming deterministic or fp32_precision, or torch.use_deterministic_algorithms,
    gets the Triton kernel even where SDPA was measured faster."""
    ms, timed, ran = measured
    _times(ms, True, sdpa=1.0)
    _times(ms, False, sdpa=1.0)
    q, k, v = (torch.randn(1, 2, 12, 16, device=device, requires_grad=True) for _ in range(3))
    causal_attention(q, k, v).sum().backward()
    assert ran[-1] == "sdpa"
    for options in ({"deterministic": True}, {"deterministic": False}, {"fp32_precision": "ieee"}):
        causal_attention(q, k, v, **options).sum().backward()
        assert ran[-1] == "triton", options
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        causal_attention(q, k, v).sum().backward()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    assert ran[-1] == "triton"


@needs_triton
def test_auto_while_tracing_uses_what_was_measured(measured, monkeypatch, device):
    """Where nothing can be timed (tracing, graph capture), a class keeps its measured choice,
    else Triton; under torch.compile a pinned SDPA backend becomes plain SDPA (no context
    manager in the graph)."""
    ms, timed, ran = measured
    q = torch.randn(1, 2, 20, 16, device=device)
    monkeypatch.setattr(auto, "can_measure", lambda q: False)
    assert lecture_flash.dispatch._measured_route(None, q, q, q, 0.25, 0.0) == "triton"
    cls = auto.class_of(q, q, 0.0, False)
    auto.CHOOSER.chosen[cls] = "sdpa-cudnn"
    assert lecture_flash.dispatch._measured_route(None, q, q, q, 0.25, 0.0) == "sdpa-cudnn"  # graph capture
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert lecture_flash.dispatch._measured_route(None, q, q, q, 0.25, 0.0) == "sdpa"
    assert timed == []


@pytest.mark.gpu
def test_auto_measures_on_a_gpu(monkeypatch, device):
    """With real timings: a class is measured once, the report names every route that ran,
    and the call's results hold to the rule whichever route won."""
    monkeypatch.setattr(auto, "CHOOSER", auto.Chooser())
    monkeypatch.setattr(lecture_flash.dispatch, "_MEASURED", {})
    torch.manual_seed(2)
    q, k, v = (torch.randn(8, 6, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    check_against_oracle(q, k, v, "auto")
    [row] = lecture_flash.auto_report()
    assert row["backward"] and row["chosen"] in row["timed_ms"] and "triton" in row["timed_ms"]
