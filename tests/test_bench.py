"""bench/run.py --quick writes the documented schema; bench/host_overhead.py runs;
bench/compile_report.py builds every kernel for an H100 without one; CPU micro-benchmarks
(--benchmark-only)."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lecture_flash import causal_attention

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
NUMBER = (int, float)


def bench_module(name):
    """A module of bench/ as its scripts import it: bench/ is a folder of scripts, which Python
    puts on sys.path when one runs (never the repository root, whose kernels/ would shadow
    Hugging Face's `kernels`)."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One run of `bench/run.py --profile` on the CPU (the small grid, a CPU's default), shared
    by the checks below (a second subprocess run would cost as much again)."""
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cpu",
                        "--profile", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, out


@pytest.mark.xdist_group("quick_bench")  # one bench run, on one worker
def test_quick_bench_writes_the_schema(quick_report):
    r, out = quick_report
    assert "== attention" in r.stdout and "== gpt_train" in r.stdout and "== generate" in r.stdout
    report = json.loads((out / "results.json").read_text())
    assert isinstance(report["device"], str) and isinstance(report["date"], str)
    assert set(report["versions"]) >= {"python", "torch", "triton", "cuda"}
    assert isinstance(report["autotune"], list)  # tile choices; empty where nothing was tuned
    assert report["complete"] is True
    assert report["settings"]["quick"] is True  # a CPU's default: the small grid
    assert report["commit"] is None or isinstance(report["commit"], str)  # None outside git
    fields = {"attention": ("impl", "pass", "dtype", "B", "H", "T", "D"),
              "gpt_train": ("impl", "dtype"), "generate": ("impl",),
              "decode": ("impl", "dtype", "B", "H", "S", "D", "lengths")}
    metrics = {"attention": ("ms", "ms_p20", "ms_p80", "tflops"),
               "gpt_train": ("tokens_per_s", "ms_per_iter"), "generate": ("tokens_per_s", "new_tokens"),
               "decode": ("ms", "ms_p20", "ms_p80")}
    for section in fields:
        rows = report[section]
        assert rows, section
        for row in rows:
            assert all(k in row for k in fields[section]), row
            if "skipped" in row:
                assert isinstance(row["skipped"], str) and not any(m in row for m in metrics[section])
            else:
                assert all(isinstance(row[m], NUMBER) and row[m] > 0 for m in metrics[section]), row
    ran = {r["impl"] for r in report["attention"] if "ms" in r}
    assert {"lecture", "naive-batched", "sdpa-math", "project-auto"} <= ran
    assert {r["impl"] for r in report["attention"] if "skipped" in r} >= {"triton", "triton-atomic-dq"}  # no GPU
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("section,impl,key,metric,value") and len(csv_lines) > 10


@pytest.mark.xdist_group("quick_bench")  # one bench run, on one worker
def test_quick_bench_output_reads_plainly_on_a_cpu(quick_report):
    """What cannot run on a CPU is said once per section, not as a failure on every line; no
    TFLOP/s or MFU columns of zeros; the CPU model is named; the run ends with verdict lines."""
    r, _ = quick_report
    out = r.stdout
    assert "not run here: triton, triton-atomic-dq (needs a CUDA GPU and triton)" in out
    assert "TFLOP/s" not in out and "mfu" not in out and "RuntimeError" not in out
    assert "the small preset: batch 16, block 32, 64 wide" in out
    assert "project:cache: only the positions that fit" in out
    verdict = out[out.index("== verdict =="):]
    for words in ("attention fwd: project-auto", "x the lecture", "training (float32): project",
                  "x sdpa-batched", "generation: project", "decode: project",
                  "x SDPA with the key mask"):
        assert words in verdict, verdict
    assert "attention:" in r.stderr  # the progress bar


@pytest.mark.xdist_group("quick_bench")  # one bench run, on one worker
def test_profile_flag_writes_where_the_step_time_goes(quick_report):
    _, out = quick_report
    rows = [row for row in json.loads((out / "results.json").read_text())["gpt_train"] if "ms_per_iter" in row]
    assert {row["impl"] for row in rows} >= {"lecture", "project"}
    for row in rows:
        assert row["profile_wall_ms"] > 0
        table = (out / f"profile-gpt_train-float32-{row['impl']}.txt").read_text()
        assert "Self CPU" in table and "aten::" in table


def test_noisy_timings_are_named():
    """A timing whose middle repeats spread past NOISY_SPREAD of its median, or a forward slower
    than the same implementation's forward+backward at the same point, is marked in its row and
    named in a line; steady ones are not."""
    harness = bench_module("harness")
    point = dict(dtype="float32", B=64, H=6, T=256, D=64)
    report = {
        "attention": [
            dict(impl="lecture", **{"pass": "fwd"}, **point, ms=515.0, ms_p20=500.0, ms_p80=530.0),
            dict(impl="lecture", **{"pass": "fwd+bwd"}, **point, ms=157.0, ms_p20=150.0, ms_p80=160.0),
            dict(impl="sdpa-math", **{"pass": "fwd"}, **point, ms=10.0, ms_p20=6.0, ms_p80=14.0),
            dict(impl="sdpa-math", **{"pass": "fwd+bwd"}, **point, ms=30.0, ms_p20=29.0, ms_p80=31.0),
            dict(impl="triton", **{"pass": "fwd"}, **point, skipped="needs a CUDA GPU"),
        ],
        "gpt_train": [dict(impl="project", dtype="float32", ms_per_iter=10.0, ms_p20=9.9, ms_p80=10.1)],
    }
    lines = harness.untrusted(report, ["attention", "gpt_train"])
    noisy = [(r["impl"], r["pass"]) for r in report["attention"] if "noisy" in r]
    assert noisy == [("lecture", "fwd"), ("sdpa-math", "fwd")], report
    assert "slower than its forward+backward 157 ms" in report["attention"][0]["noisy"]
    assert "repeats spread from 6 to 14 ms" in report["attention"][2]["noisy"]
    assert len(lines) == 2 and lines[0].startswith("  attention lecture pass=fwd dtype=float32 B=64")
    assert "noisy" not in report["gpt_train"][0]


def test_attention_section_runs_grouped_query_points(monkeypatch, capsys):
    """A grid point with fewer key/value heads than query heads (the GPU grid has H = 32,
    Hk = 8): each implementation runs it with its own grouped-query flag, checked against the
    oracle, or says why it cannot; the table shows H/Hk."""
    import types
    attention = bench_module("attention")
    monkeypatch.setattr(attention, "grid", lambda device, dtypes, quick: [(torch.float32, 1, 4, 32, 16, 2)])
    opts = types.SimpleNamespace(device=torch.device("cpu"), dtypes=[torch.float32], quick=True,
                                 profile_dir=None)
    rows = []
    attention.run(opts, rows, save=lambda: None)
    by = {(r["impl"], r["pass"]): r for r in rows}
    assert all(r["H"] == 4 and r["Hk"] == 2 for r in rows)
    assert "no grouped-query heads" in by[("lecture", "fwd")]["skipped"]
    for impl in ("naive-batched", "sdpa-math", "sdpa-flash", "project-auto"):
        assert "ms" in by[(impl, "fwd+bwd")], by[(impl, "fwd+bwd")]
    attention.print_table(rows, opts)
    assert "   4/2" in capsys.readouterr().out


def test_host_overhead_reports_every_path():
    """bench/host_overhead.py runs here (launches stubbed, interpreter) and prints each path."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--calls", "3",
                        "--repeats", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("stubbed")]
    assert [row[1] for row in rows] == ["causal_attention", "eager", "custom"], r.stdout
    assert all(float(row[-2]) > 0 and float(row[-1]) > 0 for row in rows), r.stdout


def _evidence(out, *flags):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
    r = subprocess.run([sys.executable, str(BENCH / "evidence.py"), "--device", "cpu", "--out",
                        str(out), *flags], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, json.loads((out / "results.json").read_text())


@pytest.mark.xdist_group("quick_bench")
def test_evidence_runs_every_step_at_tiny_sizes(tmp_path):
    """bench/evidence.py on a CPU: the GPU's steps at tiny sizes, in priority order, the report
    in run.py's schema after every step, the steps' table and verdict lines at the end."""
    r, report = _evidence(tmp_path)
    steps = [s["step"] for s in report["evidence"]["steps"]]
    assert steps == ["gpu_tests", "host", "attention", "training", "hopper", "features"], r.stdout
    assert all(s["status"] == "done" for s in report["evidence"]["steps"]), report["evidence"]
    assert report["complete"] is True and report["evidence"]["cut_at"] is None
    tests = report["gpu_tests"]
    assert tests["failed"] == 0 and tests["skipped"] > 0 and tests["rc"] == 0  # no GPU: skipped
    assert {r["path"] for r in report["host"]} >= {"causal_attention", "sdpa"}
    impls = {row["impl"] for row in report["attention"] if "ms" in row}
    assert {"project-auto", "sdpa-flash", "sdpa-math"} <= impls
    hopper = [row for row in report["attention"] if row["impl"] == "triton-hopper"]
    assert hopper and all("sm_90" in row["skipped"] for row in hopper)
    assert any(row.get("Hk") for row in report["attention"])  # grouped heads, step 6
    for section in ("varlen", "flash_api", "gpt_train", "generate"):
        assert any("ms" in row or "tokens_per_s" in row for row in report[section]), section
    # decode: checked against the oracle, then timed (sdpa-sliced only where rows share a length)
    timed = {(row["impl"], row["lengths"]) for row in report["decode"] if "ms" in row}
    assert timed == {("project", "equal"), ("sdpa-masked", "equal"), ("sdpa-sliced", "equal"),
                     ("project", "unequal"), ("sdpa-masked", "unequal")}, report["decode"]
    assert "decode: project" in r.stdout
    assert "== evidence ==" in r.stdout and "== verdict ==" in r.stdout
    assert "attention fwd+bwd: project-auto" in r.stdout and "training (float32)" in r.stdout


def test_evidence_stops_cleanly_at_its_budget(tmp_path):
    """With no time left nothing starts: the report says where it was cut, and is not complete."""
    r, report = _evidence(tmp_path, "--budget-s", "0.5")
    assert report["complete"] is False
    assert report["evidence"]["cut_at"] == "step 1 (gpu_tests)"
    assert "cut at step 1 (gpu_tests)" in r.stdout


def test_readme_and_docs_tables_are_what_report_py_renders():
    """No hand-copied figure: the results blocks equal bench/report.py's render of the
    committed reports (python bench/report.py --write after committing a report)."""
    r = subprocess.run([sys.executable, str(BENCH / "report.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


def test_report_py_says_not_measured_and_takes_the_newest_report(tmp_path):
    report_py = bench_module("report")
    empty = report_py.render("docs", report_py.load(tmp_path))
    assert "No report has measured this yet." in empty
    lines = empty.splitlines()
    body = [line for line, below in zip(lines, lines[1:] + [""])  # not headers, not rules
            if line.startswith("| ") and not below.startswith("|---")]
    figures = [c for line in body for c in line.strip("|").split("|")[1:]]
    assert len(body) >= 8
    assert {c.strip() for c in figures} <= {"not measured", "n/a", ""}
    base = dict(device="GPU X", versions={"torch": "t", "triton": "r"}, commit="abc1234",
                settings={"command": "python bench/evidence.py"}, complete=True)
    row = dict(impl="triton", dtype="bfloat16", B=64, H=6, T=256, D=64, ms=1.25)
    for date, ms in (("2026-12-01T00:00:00+00:00", 9.0), ("2026-12-03T00:00:00+00:00", 1.25)):
        report = dict(base, date=date, attention=[dict(row, ms=ms, **{"pass": "fwd+bwd"})])
        (tmp_path / f"{date[:10]}.json").write_text(json.dumps(report))
    text = report_py.render("readme", report_py.load(tmp_path))
    assert "| lecture's (64, 6, 256, 64), fwd+bwd | 1.250 | not measured |" in text
    assert "GPU X, torch t, triton r, 2026-12-03, commit abc1234" in text
    assert "`python bench/evidence.py`" in text and "9.000" not in text


def _can_compile_for_cuda():
    try:
        return importlib.util.find_spec("triton.backends.nvidia") is not None
    except ImportError:
        return False


# Each compile_report run below is one process busy on one core for up to a minute (less once
# Triton's cache holds the kernels). conftest.py starts them as the session starts and moves
# their checks to the end, so that they compile on the second core while the other tests run.
COMPILES = {
    # (flags, untuned choices: 3 kernels per head dim, and the fused backward for 16-bit D <= 64).
    # Every kernel at D = 40 (padded), 64 and 128 in bf16; float32, the dropout/atomic-dQ and the
    # sliding-window variants at the lecture's D = 64 (bench/compile_report.py covers the rest).
    "bf16": (["--head-dim", "40,64,128", "--dtype", "bfloat16"], 3 * 3 + 2),
    "fp32-tf32": (["--head-dim", "64", "--dtype", "float32", "--fp32-precision", "tf32"], 3),
    "fp16-dropout-nondeterministic": (["--head-dim", "64", "--dtype", "float16", "--dropout",
                                       "--nondeterministic"], 3 + 1),
    "bf16-window": (["--head-dim", "64", "--dtype", "bfloat16", "--window"], 3 + 1),
}


_COMPILE_PROCS = {}


def start_compile_reports():
    """The compile_report processes, started on the first call (once per session)."""
    if not _COMPILE_PROCS:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # The autotuned four (compile_report --portability, in CI, covers the decode kernels).
        four = [arg for kernel in ("fwd", "dkdv", "dq", "fused") for arg in ("--kernel", kernel)]
        runs = {name: ["--fixed", *four, *flags] for name, (flags, _) in COMPILES.items()}
        runs["hopper"] = ["--hopper", "--fixed", "--head-dim", "64,128"]  # kernels/hopper.py, bf16
        _COMPILE_PROCS.update({name: subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "compile_report.py"), *flags], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, flags in runs.items()})
    return _COMPILE_PROCS


@pytest.fixture(scope="session")
def compile_reports():
    procs = start_compile_reports()
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no CUDA backend to compile with")
@pytest.mark.xdist_group("compile_report")  # one worker starts and waits on the processes
@pytest.mark.parametrize("name", list(COMPILES))
def test_kernels_compile_for_an_h100(compile_reports, name):
    """The interpreter runs the kernels' logic but never compiles them: this does, for sm_90,
    with the configs the untuned launcher picks (a GPU-only compile error fails here), and
    checks that every dot became Hopper's wgmma, none the older mma.sync."""
    out, err = compile_reports[name].communicate(timeout=900)
    assert compile_reports[name].returncode == 0, out[-3000:] + err[-2000:]
    chosen = [line for line in out.splitlines() if "the untuned choice" in line]
    assert len(chosen) == COMPILES[name][1], out
    assert all(line.split()[11] == "wgmma" for line in chosen), out


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no CUDA backend to compile with")
@pytest.mark.xdist_group("compile_report")
def test_the_hopper_forward_compiles_for_an_h100(compile_reports):
    """kernels/hopper.py's opt-in forward builds for sm_90 at D = 64 and 128, with and without
    warp specialisation asked for: its tiles come by TMA (UTMALDG in the SASS), its dots are
    wgmma, and nothing spills."""
    out, err = compile_reports["hopper"].communicate(timeout=900)
    assert compile_reports["hopper"].returncode == 0, out[-3000:] + err[-2000:]
    rows = [line.split() for line in out.splitlines() if line.startswith("hopper")]
    assert len(rows) == 4, out
    for row in rows:  # kernel dtype D BMxBN warps stages regs stack shared TMA WS SASS mma
        assert row[7] == "0" and row[9] == "yes" and row[12] == "wgmma", out


def test_the_nanogpt_style_model_generates_as_ours():
    """bench's nanoGPT-style model (its attention one SDPA call) keeps generation's KV cache:
    with our weights, its greedy tokens are ours, through the cache and past block_size."""
    _nanogpt_style = bench_module("gpt_train")._nanogpt_style
    from lecture_flash.gpt import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    torch.manual_seed(0)
    ours = GPT(cfg).double().eval()
    theirs = _nanogpt_style(cfg).double().eval()
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(65, (2, 3))
    assert torch.equal(theirs.generate(idx, 20, temperature=0), ours.generate(idx, 20, temperature=0))


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return [torch.randn(8, 6, 256, 64) for _ in range(3)]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_benchmark_attention_forward(benchmark, qkv, backend):
    out = benchmark(lambda: causal_attention(*qkv, backend=backend))
    assert out.shape == qkv[0].shape


def test_benchmark_generate(benchmark):
    from lecture_flash.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_embd=64, n_head=4, n_layer=4, dropout=0.0)).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    out = benchmark(lambda: model.generate(idx, 64, seed=0))
    assert out.shape == (1, 65)


def test_speedrun_section_times_both_models_to_the_target(monkeypatch, text_path, capsys):
    """bench/speedrun.py's run on a CPU at a tiny size (its real run wants a GPU): gpt.train
    trains our model and the nanoGPT-style one to the target, and the section reports the wall
    time, steps and val loss of each, with a verdict line."""
    import types
    speedrun = bench_module("speedrun")
    monkeypatch.setenv("GPT_DATA", str(text_path))
    monkeypatch.setattr(speedrun, "ARGV", ["--preset", "speedrun", "--n-embd", "32", "--n-head", "2",
                                           "--n-layer", "2", "--block-size", "32", "--batch-size", "8",
                                           "--lr", "3e-3", "--warmup-iters", "5", "--max-iters", "300",
                                           "--eval-interval", "25", "--eval-iters", "4"])
    monkeypatch.setattr(speedrun, "TARGET", 3.0)
    opts, rows = types.SimpleNamespace(device=torch.device("cpu")), []
    speedrun.run(opts, rows, lambda: None)
    assert [r["impl"] for r in rows] == ["project", "project:no-compile", "sdpa-batched"]
    assert rows[1]["skipped"] == "CUDA graphs need a GPU"
    ran = [rows[0], rows[2]]
    assert all(r["seconds"] > 0 and 0 < r["steps"] < 300 and r["val"] <= 3.0 for r in ran), rows
    speedrun.print_table(rows, opts)
    assert "to val loss 3.0" in capsys.readouterr().out
    assert speedrun.verdict(rows, opts)[0].startswith("speedrun: project reaches val loss 3.0 in")


def test_tuned_configs_are_written_from_autotuned_reports(tmp_path):
    """bench/tuned_configs.py keeps the tuned choices of GPU reports (not untuned ones, not
    dropout or split variants, not rows without an arch), the newest report winning, and writes
    a table kernels/flash_configs.py reads."""
    tuned = bench_module("tuned_configs")
    row = dict(kernel="dq", dtype="bfloat16", device="cuda:0", arch="sm_86", TQ_BUCKET=4096,
               TK_BUCKET=4096, HEAD_DIM=64, DROPOUT=False, FP32_PRECISION="ieee",
               DETERMINISTIC=True, SPLIT=False, chosen="128x32, 4 warps, 3 stages",
               timed_ms={"128x64, 8 warps, 2 stages": 1.2, "128x32, 4 warps, 3 stages": 1.0})
    older = dict(date="2026-12-01", autotune=[{**row, "chosen": "64x32, 4 warps, 3 stages"}])
    newer = dict(date="2026-12-02", autotune=[row, {**row, "DROPOUT": True, "HEAD_DIM": 128},
                                             {**row, "arch": None, "HEAD_DIM": 32},
                                             {**row, "timed_ms": {}, "HEAD_DIM": 16}])
    paths = []
    for i, report in enumerate((newer, older)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "flash_tuned.py"
    assert tuned.main([*map(str, paths), "--out", str(out)]) == 0
    scope = {}
    exec(out.read_text(), scope)
    assert scope["TUNED"] == {("sm_86", "dq", "bfloat16", 64, 4096, 4096): (128, 32, 4, 3)}
    from lecture_flash.flash_tuned import TUNED  # the committed table: written by the script
    assert (ROOT / "kernels" / "flash_tuned.py").read_text().startswith(tuned.DOC)
    assert all(len(key) == 6 and len(value) == 4 for key, value in TUNED.items())


# A stand-in compiler for --portability: every fused config wider than 32 rows fails to compile
# (as Triton 3.6's pipeliner fails them on sm_100 and sm_120), and on sm_80 so does every dq.
_FALLING_THROUGH = """
import concurrent.futures, sys
sys.path.insert(0, sys.argv[1])
import compile_report as cr

def compile_one(job):
    arch, kind, dtype, D, (bm, bn, warps, stages) = job
    if (kind == "fused" and bm > 32) or (kind == "dq" and arch == 80):
        return job, "RuntimeError: PassManager::run failed", 0.5
    return job, dict(regs=100, stack=0, shared=1024, mma="mma.sync"), 0.25

cr._compile_one = compile_one
cr.concurrent.futures.ProcessPoolExecutor = concurrent.futures.ThreadPoolExecutor
sys.exit(cr.portability([64], 1))
"""


def test_portability_follows_the_runtime_past_a_config_that_fails():
    """--portability tries a kernel's next config where the chosen one does not compile or load,
    as the runtime does (autotune.first_that_loads), counts the failed compiles in a first
    step's seconds and says so in its verdict; a kernel none of whose configs works would fail.
    Either exits 1. A kernel whose first config works compiles that one alone."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _FALLING_THROUGH, str(BENCH)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    verdict = {line.split(":")[0]: line for line in r.stdout.split("== verdict ==")[1].splitlines()
               if line.strip()}
    sm90 = verdict["sm_90"]
    assert "runs fp32 D 64; runs after failed configs: fp16 D 64 (fused: " in sm90, sm90
    assert "failed config(s) (the first does not compile (RuntimeError: PassManager::run " \
           "failed)), then 32x32, 4 warps, 1 stage(s))" in sm90, sm90
    tried = [row for row in map(str.split, r.stdout.splitlines()) if row[:3] == ["sm_90", "bf16", "64"]]
    kinds = [row[3] for row in tried]
    assert kinds.count("fwd") == kinds.count("decode") == 1, kinds
    failed = sum(1 for row in tried if row[3] == "fused" and "FAILED" in row)
    assert failed >= 1 and kinds.count("fused") == failed + 1, tried
    # the lecture's first step: fwd and the fused kernel's failed and final compiles
    assert f"{0.25 + 0.5 * failed + 0.25:.1f} s for the lecture's first training step" in sm90, sm90
    assert "would fail: fp32 D 64 (dq: all " in verdict["sm_80"], verdict["sm_80"]
    assert verdict["sm_75"].startswith("sm_75: runs nothing; falls back to SDPA for"), verdict["sm_75"]


@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no GPU backends to compile with")
def test_compile_report_reads_amd_and_blackwell_builds():
    """compile_report on an MI300 (AMD: registers and scratch from the code object's notes,
    mfma) and a B200 (tcgen05 in the SASS), on the merge kernel and the preprocess, which
    compile in a second: the fields every target's row needs are read."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for arch, mma in (("gfx942", "none"), ("100", "none")):
        r = subprocess.run([sys.executable, str(BENCH / "compile_report.py"), "--arch", arch, "--fixed",
                            "--kernel", "combine", "--kernel", "preprocess", "--head-dim", "64"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("combine", "preprocess"))]
        assert len(rows) == 2, r.stdout
        for row in rows:  # kernel dtype D BMxBN warps stages regs stack shared pipelined instr mma
            assert row[6].isdigit() and row[7].isdigit() and int(row[10]) > 0 and row[11] == mma, r.stdout
