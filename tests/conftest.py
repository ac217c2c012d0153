import os
import random
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable
# must be set before triton is first imported, which happens when `lecture_flash` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _refuse_the_root_on_sys_path():
    """The tests import the installed lecture_flash. With the repository root on sys.path
    (`python -m pytest` run from it, or PYTHONPATH=.) its kernels/ folder would be imported as
    Hugging Face's `kernels` package, which transformers imports: say so instead of failing
    there."""
    if any(Path(p or ".").resolve() == ROOT for p in sys.path):
        pytest.exit("the repository root is on sys.path (python -m pytest, or PYTHONPATH=.), where "
                    "its kernels/ folder shadows Hugging Face's `kernels`: run `pytest` instead",
                    returncode=4)
    try:
        import lecture_flash  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "lecture_flash":
            raise
        pytest.exit("lecture_flash is not installed: pip install -e \".[test]\" (offline: "
                    "pip install --no-deps --no-build-isolation -e .)", returncode=4)


def _release(version):
    """'3.6.0+git1' -> (3, 6): the release's major and minor numbers."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])


def _refuse_an_interpreter_that_cannot_run():
    """Triton 3.6's interpreter (and older) turns its 1-element scalar arrays into ints with
    int(array), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"); Triton 3.7 squeezes them first. Under that pair every kernel test would fail on
    the interpreter's error: say which pair it is instead (GPU runs compile, and are unaffected)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from importlib.metadata import PackageNotFoundError, version
    try:
        triton_version, numpy_version = version("triton"), version("numpy")
    except PackageNotFoundError:
        return
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        pytest.exit(f"Triton {triton_version}'s interpreter cannot run under NumPy {numpy_version} "
                    "(it converts 1-element arrays to ints, which NumPy 2.4 refuses; Triton 3.7 "
                    "fixed it): pip install 'numpy<2.4', or a newer triton", returncode=4)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    _refuse_the_root_on_sys_path()
    _refuse_an_interpreter_that_cannot_run()
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU, with the reason)")
    if not config.pluginmanager.hasplugin("xdist"):  # pytest-xdist registers it itself
        config.addinivalue_line("markers", "xdist_group(name): tests that share one worker")
    _two_workers(config)


_LOADGROUP = "LECTURE_FLASH_TESTS_LOADGROUP"


def _two_workers(config):
    """Run the suite on two processes (pytest-xdist, in the test extras) unless -n was given:
    the interpreter is single-threaded Python, and this machine has two cores. Without xdist
    (a GPU image that lacks it) the suite runs in one process as before."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not config.getoption("benchmark_only", False):
        config.option.benchmark_skip = True  # as the controller (below): no warning per worker
        # Workers parse the command line afresh: the controller's --dist loadgroup (below)
        # reaches them through the environment.
        config.option.loadgroup = config.option.loadgroup or bool(os.environ.get(_LOADGROUP))
        torch.set_num_threads(1)  # two workers of two threads each would oversubscribe two cores
        return
    if (not config.pluginmanager.hasplugin("xdist")
            or config.getoption("numprocesses", None) is not None
            or config.getoption("collectonly", False)
            or config.getoption("benchmark_only", False)):  # timings want one process
        return
    config.option.numprocesses = 2
    config.option.tx = ["popen"] * 2
    config.option.benchmark_skip = True  # skipped anyway without --benchmark-only (below)
    if config.option.dist == "no":
        # Tests marked xdist_group share a worker (one bench run, the compile processes):
        # --dist loadgroup, and the flag xdist derives from it before this hook runs.
        config.option.dist = "loadgroup"
        config.option.loadgroup = True
        os.environ[_LOADGROUP] = "1"
    # One thread per process (the workers and the programs the tests start): two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


COMPILE_CHECKS = ("test_kernels_compile_for_an_h100",  # tests/test_bench.py
                  "test_the_hopper_forward_compiles_for_an_h100")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; the interpreter twin of this test runs on CPU")
    # pytest-benchmark micro-benchmarks run only when asked for (pytest --benchmark-only).
    no_bench = pytest.mark.skip(reason="a micro-benchmark: run with pytest --benchmark-only")
    bench_only = config.getoption("benchmark_only", default=False)
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "benchmark" in getattr(item, "fixturenames", ()) and not bench_only:
            item.add_marker(no_bench)
    # The compile checks wait on subprocesses that _start_compiles launches as the session
    # starts: checked last, they cost the session little more than their own slowest process.
    # With two workers the one that runs them starts the processes: first, so that they
    # compile while the other worker runs the rest.
    compiles = [item for item in items if getattr(item, "originalname", None) in COMPILE_CHECKS]
    rest = [item for item in items if item not in compiles]
    items[:] = compiles + rest if os.environ.get("PYTEST_XDIST_WORKER") else rest + compiles


@pytest.fixture(scope="session", autouse=True)
def _start_compiles(request):
    """Start bench/compile_report.py's runs (tests/test_bench.py) now, if their checks are
    selected and can run: they compile on the second core while the other tests run."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # several workers: the one that runs the checks starts them (test_bench.py)
    for item in request.session.items:
        if getattr(item, "originalname", None) in COMPILE_CHECKS:
            if item.module._can_compile_for_cuda():
                item.module.start_compile_reports()
            break


@pytest.fixture(autouse=True)
def _fresh_launch_plans(monkeypatch):
    """Each test works its Triton launches out afresh: a launch plan cached by an earlier test
    would keep the config, tiles and int64 decision that a test's monkeypatching changes."""
    launch = sys.modules.get("lecture_flash.flash_launch")
    if launch is not None:
        monkeypatch.setattr(launch, "_PLANS", {})
    flash = sys.modules.get("lecture_flash.flash")
    if flash is not None:  # and forgets what a test's failing kernels left in the guard
        monkeypatch.setattr(flash, "FAILED", {})


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generated_text(n_chars=60_000, seed=0):
    """A stand-in corpus with Shakespeare's flavour of structure, for machines without the file."""
    rng = random.Random(seed)
    words = ("the king my lord thou art what shall we do good night sweet prince to be or not "
             "that is question love hath made me fool o romeo wherefore fair").split()
    names = ("ROMEO", "JULIET", "HAMLET", "KING", "QUEEN")
    lines = []
    while sum(len(s) for s in lines) < n_chars:
        lines.append(f"{rng.choice(names)}:")
        for _ in range(rng.randint(1, 4)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + rng.choice(".,;!?"))
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def text_path(tmp_path_factory):
    """Tiny Shakespeare from the shared folder (or $GPT_DATA), else a small generated text."""
    for candidate in (os.environ.get("GPT_DATA"), SHARED_TEXT):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    path = tmp_path_factory.mktemp("data") / "generated.txt"
    path.write_text(_generated_text())
    return path
