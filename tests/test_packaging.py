"""What `pip install .` and `pip install -e .` give: one package, `lecture_flash` (with
`lecture_flash.gpt`), importable beside Hugging Face's `kernels` from any folder; nothing
installed under the names `kernels` or `gpt`."""
import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lecture_flash
import lecture_flash.gpt
from helpers import OUTSIDE

ROOT = Path(__file__).resolve().parents[1]
# The folders (the design's names) and the packages they install as.
FOLDERS = {"kernels": "lecture_flash", "gpt": "lecture_flash/gpt"}


def _modules_in(folder):
    return {p.name for p in (ROOT / folder).glob("*.py")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install .` would install, built from this checkout (with the setuptools
    this Python has when it is new enough, else in pip's isolated build environment)."""
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the build reads: setuptools builds in the source folder, and
    # would leave build/ and *.egg-info behind in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in ("kernels", "gpt"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    isolation = []
    try:
        import setuptools
        version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
        # bdist_wheel is setuptools' own from 70.1 on, the `wheel` package's before (a new
        # Python 3.11 venv has setuptools 65 and no `wheel`: then the isolated build).
        if version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel")):
            isolation = ["--no-build-isolation"]
    except (ImportError, ValueError):
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=300,
                       cwd=OUTSIDE)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    [path] = out.glob("lecture_flash-*.whl")
    return path


def test_the_wheel_holds_lecture_flash_and_nothing_named_kernels_or_gpt(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    code = {n for n in names if ".dist-info/" not in n}
    expected = {f"{package}/{m}" for folder, package in FOLDERS.items() for m in _modules_in(folder)}
    assert code == expected, (sorted(code - expected), sorted(expected - code))
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"kernels", "gpt", "bench", "tests"}, tops
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lecture-flash-train = lecture_flash.gpt.cli:train" in text, text
    assert "lecture-flash-sample = lecture_flash.gpt.cli:sample" in text, text


def test_the_editable_install_offers_the_same_modules_as_the_wheel(wheel):
    """This process imports the package as installed here (editable in CI): the same modules,
    from the checkout's folders, as the wheel's."""
    in_wheel = {n[:-3].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist()
                if n.endswith(".py") and ".dist-info/" not in n}
    here = {"lecture_flash", "lecture_flash.gpt"}
    for package in (lecture_flash, lecture_flash.gpt):  # each package's own folder
        here |= {m.name for m in pkgutil.iter_modules(package.__path__, package.__name__ + ".")}
    in_wheel = {n[:-len(".__init__")] if n.endswith(".__init__") else n for n in in_wheel}
    assert here == in_wheel, (sorted(here - in_wheel), sorted(in_wheel - here))


def _run_outside(code, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=OUTSIDE, env=env)


BESIDE_HF = """
import kernels, transformers
from transformers import AttentionInterface
import lecture_flash, lecture_flash.hf
from lecture_flash import (causal_attention, decode_attention, scaled_dot_product_attention,
                           MultiHeadAttention, available_backends, set_defaults)
from lecture_flash.gpt import GPT, GPTConfig
assert "site-packages" in kernels.__file__ and not hasattr(kernels, "causal_attention"), kernels.__file__
name = lecture_flash.hf.register()
assert name in AttentionInterface._global_mapping, name
print(lecture_flash.__file__)
"""


def test_imports_beside_hugging_face_kernels_from_outside_the_repo():
    """transformers >= 5.25 imports Hugging Face's `kernels` (the hub-kernels loader); ours
    imports as lecture_flash, so both load in one process, from a folder with no checkout."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (the test extras install it)")
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers >= 5.25 requires it)")
    r = _run_outside(BESIDE_HF)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_wheel_imports_and_its_commands_run(wheel, tmp_path):
    """The wheel, unpacked where a plain install puts it, ahead of the editable finder: the
    package imports from there, and `python -m lecture_flash.gpt.train --help` runs."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run_outside("import lecture_flash, lecture_flash.gpt.train; print(lecture_flash.__file__);"
                     "print(lecture_flash.gpt.train.__file__)", pythonpath=target)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(line.startswith(str(target)) for line in r.stdout.split()), r.stdout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "lecture_flash.gpt.train", "--help"],
                       capture_output=True, text=True, timeout=300, cwd=OUTSIDE,
                       env={**env, "PYTHONPATH": str(target)})
    assert r.returncode == 0 and "--preset" in r.stdout, r.stderr[-2000:]


def test_nothing_of_ours_answers_to_the_old_names():
    """No alias or shim: `kernels` is Hugging Face's (or absent), `gpt` absent."""
    r = _run_outside("import importlib.util as u, lecture_flash, lecture_flash.gpt\n"
                     "for name in ('kernels', 'gpt'):\n"
                     "    spec = u.find_spec(name)\n"
                     "    print(name, spec.origin if spec else None)")
    assert r.returncode == 0, r.stderr[-2000:]
    for line in r.stdout.splitlines():
        name, origin = line.split(" ", 1)
        assert origin == "None" or not origin.startswith(str(ROOT)), line


def _imports(package, folder):
    """{module: the lecture_flash modules it imports (anywhere in it, function bodies too)}
    for the .py files of `folder`, installed as `package`."""
    import ast
    graph = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        here = package  # the package relative imports start from
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("lecture_flash")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if not base.startswith("lecture_flash"):
                    continue
                for alias in node.names:  # a submodule by that name, else a name in base
                    sub = f"{base}.{alias.name}"
                    found.add(sub if _module_file(sub) else base)
        graph[name] = found - {name}
    return graph


def _module_file(name):
    parts = name.split(".")
    if parts[:2] == ["lecture_flash", "gpt"]:
        folder, rest = ROOT / "gpt", parts[2:]
    else:
        folder, rest = ROOT / "kernels", parts[1:]
    if not rest:
        return folder / "__init__.py"
    return (folder / f"{rest[0]}.py") if len(rest) == 1 and (folder / f"{rest[0]}.py").exists() else None


def test_no_import_circles_and_the_attention_never_imports_the_gpt():
    graph = {**_imports("lecture_flash", "kernels"), **_imports("lecture_flash.gpt", "gpt")}
    assert len(graph) == len(_modules_in("kernels")) + len(_modules_in("gpt")), sorted(graph)
    for name, deps in graph.items():
        if not name.startswith("lecture_flash.gpt"):
            assert not any(d.startswith("lecture_flash.gpt") for d in deps), (name, deps)
    # Depth-first search for a path back to where it started.
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
