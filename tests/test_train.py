"""Training, checkpoints, exact resume, and the command lines, run as a user runs them."""
import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import OUTSIDE, cli_error, run_module
from lecture_flash.gpt.train import main as train_main

TINY = ["--preset", "tiny", "--n-embd", "16", "--n-layer", "1", "--batch-size", "4",
        "--block-size", "16", "--eval-iters", "2", "--no-progress", "--sample-tokens", "20"]


def run_cli(command, *args):
    """lecture-flash-COMMAND ARGS (python -m lecture_flash.gpt.COMMAND, from outside the repo)."""
    return run_module(f"lecture_flash.gpt.{command}", *args)


def test_training_lowers_the_loss(tmp_path, text_path):
    from lecture_flash.gpt.train import parse_args, train
    base = ["--preset", "tiny", "--data", str(text_path), "--no-progress", "--sample-tokens", "0",
            "--eval-interval", "150"]
    _, before = train(parse_args([*base, "--out-dir", str(tmp_path / "a"), "--max-iters", "0"]))
    _, after = train(parse_args([*base, "--out-dir", str(tmp_path / "b"), "--max-iters", "150"]))
    assert after["val"] < before["val"] - 0.5, (before, after)


def test_resume_is_exact(tmp_path, text_path):
    common = [*TINY, "--data", str(text_path), "--dropout", "0.1", "--eval-interval", "5"]
    train_main([*common, "--out-dir", str(tmp_path / "straight"), "--max-iters", "12"])
    train_main([*common, "--out-dir", str(tmp_path / "split"), "--max-iters", "7"])
    train_main([*common, "--out-dir", str(tmp_path / "split"), "--max-iters", "12", "--resume"])
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_train_and_sample_cli(tmp_path, text_path):
    r = run_cli("train", *TINY, "--data", str(text_path), "--out-dir", str(tmp_path), "--max-iters", "3")
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and (tmp_path / "ckpt.pt").is_file()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert set(ckpt) >= {"model", "optimizer", "config", "iter", "tokenizer", "rng"}
    assert set(ckpt["rng"]) == {"torch", "cuda", "data"}
    r = run_cli("sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO", "--max-new-tokens", "30",
                "--seed", "1", "--top-k", "5", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO") and len(r.stdout) >= 30 and "tokens/s" in r.stderr
    again = run_cli("sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO", "--max-new-tokens", "30",
                    "--seed", "1", "--top-k", "5", "--top-p", "0.9")
    assert again.stdout == r.stdout  # a seed reproduces the text


def test_sample_from_a_raw_lecture_state_dict(tmp_path, text_path, capsys):
    from lecture_flash.gpt.data import CharTokenizer, load_text
    from lecture_flash.gpt.lecture import GPTLanguageModel
    vocab = CharTokenizer.from_text(load_text(text_path)).vocab_size
    torch.save(GPTLanguageModel(vocab, block_size=16, n_embd=16, n_head=2, n_layer=1).state_dict(), tmp_path / "lec.pt")
    r = run_cli("sample", "--ckpt", str(tmp_path / "lec.pt"), "--vocab-from", str(text_path), "--block-size", "16",
                "--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--max-new-tokens", "20", "--stop", "e")
    assert r.returncode == 0, r.stderr
    # The shape is read off the tensors: the size flags are not needed.
    from lecture_flash.gpt.sample import main as sample_main
    sample_main(["--ckpt", str(tmp_path / "lec.pt"), "--vocab-from", str(text_path),
                 "--max-new-tokens", "20", "--seed", "0"])
    assert len(capsys.readouterr().out) > 20
    assert "--vocab-from" in cli_error(sample_main, "--ckpt", tmp_path / "lec.pt")


def test_cli_errors_are_one_line(tmp_path, text_path):
    cases = [
        (["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)], "does not exist"),
        (["--data", str(text_path), "--out-dir", str(tmp_path / "fresh"), "--resume"], "no checkpoint"),
        (["--data", str(text_path), "--out-dir", "/proc/forbidden"], "cannot write to out-dir"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((["--data", str(empty), "--out-dir", str(tmp_path)], "is empty"))
    # The first case runs the command line as a user does; the rest call its main() in this
    # process, which turns the same problems into the same one-line exit (and saves seconds).
    (args, words), *rest = cases
    r = run_cli("train", *TINY, *args)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for args, words in rest:
        assert words in cli_error(train_main, *TINY, *args), args


def ckpt_iter(path):
    return torch.load(path, weights_only=True)["iter"]


def test_a_fresh_run_never_replaces_a_checkpoint_silently(tmp_path, text_path):
    args = [*TINY, "--data", text_path, "--out-dir", tmp_path, "--sample-tokens", "0"]
    train_main([str(a) for a in [*args, "--max-iters", "4"]])
    assert "--resume continues it, --overwrite starts over" in cli_error(train_main, *args, "--max-iters", "2")
    assert ckpt_iter(tmp_path / "ckpt.pt") == 4
    train_main([str(a) for a in [*args, "--max-iters", "2", "--overwrite"]])
    assert ckpt_iter(tmp_path / "ckpt.pt") == 2


def test_resume_never_goes_back_nor_changes_the_model(tmp_path, text_path):
    args = [*TINY, "--data", text_path, "--out-dir", tmp_path, "--sample-tokens", "0"]
    train_main([str(a) for a in [*args, "--max-iters", "6"]])
    for extra, words in [(["--max-iters", "3"], "--max-iters 3 is below the checkpoint's iteration 6"),
                         (["--n-embd", "32"], "--n-embd 32 contradicts the checkpoint's model (n_embd 16)"),
                         (["--block-size", "8"], "--block-size 8 contradicts"),
                         (["--dropout", "0.3"], "--dropout 0.3 contradicts")]:
        assert words in cli_error(train_main, *args, "--resume", *extra)
        assert ckpt_iter(tmp_path / "ckpt.pt") == 6
    train_main([str(a) for a in [*args, "--resume", "--max-iters", "8", "--n-embd", "16"]])  # agrees
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter"] == 8 and saved["train_args"]["n_embd"] == saved["config"]["n_embd"] == 16


def test_a_diverging_run_keeps_the_last_good_checkpoint(tmp_path, text_path):
    args = [*TINY, "--data", text_path, "--out-dir", tmp_path, "--sample-tokens", "0",
            "--eval-interval", "5"]
    train_main([str(a) for a in [*args, "--max-iters", "5"]])
    message = cli_error(train_main, *args, "--resume", "--max-iters", "30", "--lr", "1e30")
    assert "not finite" in message and "kept the checkpoint of iteration 5" in message, message
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter"] == 5 and all(torch.isfinite(t).all() for t in saved["model"].values())


@pytest.mark.parametrize("extra, words", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-1"], "--batch-size must be at least 1"),
    (["--eval-interval", "0"], "--eval-interval must be at least 1"),
    (["--eval-iters", "-1"], "--eval-iters must be at least 1"),
    (["--max-iters", "-5"], "--max-iters must be at least 0"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--min-lr", "0"], "--min-lr must be a positive finite number"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--warmup-iters", "-1"], "--warmup-iters must be at least 0"),
    (["--target-loss", "nan"], "--target-loss must be a finite number"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a CUDA device, got cpu"),
    (["--n-embd", "30", "--n-head", "4"], "must be divisible"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_values_are_refused_in_one_line(tmp_path, text_path, extra, words):
    assert words in cli_error(train_main, *TINY, "--data", text_path, "--out-dir", tmp_path, *extra)


def test_an_unknown_backend_is_refused_before_anything_is_built(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main([*TINY, "--out-dir", str(tmp_path), "--backend", "bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_data_errors_name_the_file_in_one_line(tmp_path, monkeypatch):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1") * 100)
    out = ["--out-dir", tmp_path / "out"]
    assert "is not UTF-8 text" in cli_error(train_main, *TINY, *out, "--data", latin)
    assert "is a directory" in cli_error(train_main, *TINY, *out, "--data", tmp_path)
    monkeypatch.setenv("GPT_DATA", str(tmp_path / "nowhere.txt"))
    assert "GPT_DATA: data file" in cli_error(train_main, *TINY, *out)


def test_interrupt_before_the_first_checkpoint_says_so(tmp_path, text_path):
    p = subprocess.Popen([sys.executable, "-m", "lecture_flash.gpt.train", *TINY, "--data", str(text_path),
                          "--out-dir", str(tmp_path), "--max-iters", "100000", "--eval-interval", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=OUTSIDE)
    assert "parameters" in p.stdout.readline()  # training has started
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "before the first checkpoint was written: nothing to resume" in err, err
    assert not (tmp_path / "ckpt.pt").exists()


# A Ctrl-C that arrives while torch is being imported, at the start of a command line: an audit
# hook raises KeyboardInterrupt at that import, as the signal would (no timing involved).
INTERRUPTED_IMPORT = """
import sys
def interrupt(event, args):
    if event == "import" and args[0] == "torch":
        raise KeyboardInterrupt
sys.addaudithook(interrupt)
sys.argv = ["lecture-flash-{command}", "--preset", "tiny", "--out-dir", {out!r}]
from lecture_flash.gpt.cli import {command}
sys.exit({command}())
"""


@pytest.mark.parametrize("command", ["train", "sample"])
def test_ctrl_c_while_starting_prints_one_line(tmp_path, command):
    """The console scripts' entry points (lecture_flash.gpt.cli) import torch inside, so a Ctrl-C
    during those seconds ends with one line, not Python's traceback of the import; and no
    out-dir is left behind."""
    out = str(tmp_path / "out")
    code = INTERRUPTED_IMPORT.format(command=command, out=out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=OUTSIDE, env=env)
    assert r.returncode == 1 and r.stderr == "interrupted while starting: nothing was written\n", r.stderr
    assert not os.path.exists(out)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, text_path, capsys):
    """--resume on a run that reached --max-iters says so and writes, evaluates and samples
    nothing; a larger --max-iters continues it."""
    args = [*TINY, "--data", text_path, "--out-dir", tmp_path, "--max-iters", "3"]
    train_main([str(a) for a in args])
    before = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    train_main([str(a) for a in [*args, "--resume"]])
    out = capsys.readouterr().out
    assert out == (f"{tmp_path / 'ckpt.pt'} holds a finished run, nothing to do: iteration 3 of "
                   "--max-iters 3; a larger --max-iters trains it further\n"), out
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    train_main([str(a) for a in [*args, "--resume", "--max-iters", "5", "--sample-tokens", "0"]])
    assert ckpt_iter(tmp_path / "ckpt.pt") == 5


def test_resume_of_a_run_that_reached_its_target_changes_nothing(tmp_path, text_path, capsys):
    """A run stopped by --target-loss is finished too (its checkpoint says what it reached); a
    stricter target continues it."""
    args = [*TINY, "--data", text_path, "--out-dir", tmp_path, "--max-iters", "50",
            "--eval-interval", "5", "--target-loss", "10", "--sample-tokens", "0"]
    train_main([str(a) for a in args])  # a random start's loss (about 4.2) is below 10: step 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter"] == 0 and saved["reached_val"] <= 10
    capsys.readouterr()
    train_main([str(a) for a in [*args, "--resume"]])
    out = capsys.readouterr().out
    assert "holds a finished run, nothing to do: its val loss" in out and "reached --target-loss 10" in out, out
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    train_main([str(a) for a in [*args, "--resume", "--target-loss", "0.5"]])  # not reached: all 50
    assert ckpt_iter(tmp_path / "ckpt.pt") == 50


def test_a_missing_data_file_is_reported_before_the_checkpoint(tmp_path, text_path):
    """An out-dir holding a checkpoint and a data file that is not there: the data is what to
    fix first (--resume would need it too)."""
    args = [*TINY, "--out-dir", tmp_path, "--max-iters", "2", "--sample-tokens", "0"]
    train_main([str(a) for a in [*args, "--data", text_path]])
    assert "data file" in cli_error(train_main, *args, "--data", tmp_path / "nowhere.txt")


def test_a_failed_start_leaves_no_empty_out_dir(tmp_path, text_path):
    """An out-dir the run created is removed again when the run fails before writing to it; one
    that was there before is left as it was."""
    bad = [*TINY, "--data", text_path, "--n-embd", "30", "--n-head", "4"]  # 30 % 4 != 0
    assert "divisible" in cli_error(train_main, *bad, "--out-dir", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    assert "divisible" in cli_error(train_main, *bad, "--out-dir", tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


def test_sample_reports_shape_problems_usefully(tmp_path, text_path):
    from lecture_flash.gpt.data import CharTokenizer, load_text
    from lecture_flash.gpt.lecture import GPTLanguageModel
    from lecture_flash.gpt.sample import main as sample_main
    vocab = CharTokenizer.from_text(load_text(text_path)).vocab_size
    state = GPTLanguageModel(vocab, block_size=16, n_embd=16, n_head=2, n_layer=2).state_dict()
    del state["blocks.1.ffwd.net.0.bias"]
    torch.save(state, tmp_path / "lec.pt")
    message = cli_error(sample_main, "--ckpt", tmp_path / "lec.pt", "--vocab-from", text_path)
    assert "Missing key(s)" in message and "blocks.1.ffwd.net.0.bias" in message, message
    assert "does not exist" in cli_error(sample_main, "--ckpt", tmp_path / "lec.pt",
                                         "--vocab-from", tmp_path / "x.txt")
    assert "--max-new-tokens must be at least 0" in cli_error(sample_main, "--ckpt", tmp_path / "lec.pt",
                                                              "--max-new-tokens", "-3")


def test_help_shows_the_presets_and_their_default(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    assert "{lecture,small,speedrun,tiny}" in out and "default: lecture" in out


def test_a_newcomer_on_a_cpu_is_told_what_to_expect(tmp_path, text_path, capsys):
    """No --preset on a CPU starts the lecture's run: say it takes hours; without a progress
    bar, print an ETA once ten steps are timed."""
    small = ["--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
             "--eval-iters", "1", "--max-iters", "25", "--eval-interval", "100", "--no-progress",
             "--sample-tokens", "0", "--device", "cpu"]
    train_main([*small, "--data", str(text_path), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "note: the lecture preset takes hours on a CPU; --preset tiny trains in seconds" in out
    assert "min of training to go" in out


def test_learning_rate_schedule():
    """Linear warm-up, then constant, or with min_lr nanoGPT's cosine decay to min_lr."""
    from lecture_flash.gpt.train import lr_at
    hp = dict(lr=1e-3, warmup_iters=10, min_lr=1e-4, max_iters=110)
    assert lr_at(0, hp) == pytest.approx(1e-4) and lr_at(9, hp) == pytest.approx(1e-3)
    assert lr_at(10, hp) == pytest.approx(1e-3) and lr_at(60, hp) == pytest.approx(5.5e-4)
    assert lr_at(110, hp) == pytest.approx(1e-4) and lr_at(500, hp) == pytest.approx(1e-4)
    assert lr_at(50, {**hp, "min_lr": None}) == 1e-3 and lr_at(0, {**hp, "warmup_iters": 0,
                                                                   "min_lr": None}) == 1e-3


def test_speedrun_stops_at_its_target_and_says_how_long_it_took(tmp_path, text_path, capsys):
    """The speedrun preset's logic at a tiny size (its real run wants a GPU): the schedule, the
    stop at the first evaluation whose val loss reaches the target, the wall time from the
    start, and a checkpoint of the step it stopped at."""
    train_main(["--preset", "speedrun", "--n-embd", "32", "--n-head", "2", "--n-layer", "2",
                "--block-size", "32", "--batch-size", "8", "--warmup-iters", "5", "--lr", "3e-3",
                "--max-iters", "400", "--eval-interval", "25", "--eval-iters", "4",
                "--target-loss", "3.0", "--data", str(text_path), "--out-dir", str(tmp_path),
                "--no-progress", "--sample-tokens", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "reached val loss" in out and "s from the start (compile included)" in out, out
    assert "step 25: val loss" in out and "train loss" not in out  # the val split alone
    step = int(out.split("reached val loss")[1].split("at step ")[1].split(":")[0])
    assert 0 < step < 400 and step % 25 == 0
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter"] == step and saved["train_args"]["target_loss"] == 3.0


@pytest.mark.gpu
def test_captured_training_step_trains_as_the_eager_one(tmp_path, text_path):
    """--cuda-graphs (the whole step, AdamW included, and the evaluation's forward, captured once
    and replayed): the weights
    of 12 steps with a warm-up and cosine schedule as the eager loop gives them (to float
    rounding: the captured AdamW keeps its lr and step count on the device), and a run split by
    --resume ends bitwise where the captured run straight through ends."""
    common = [*TINY, "--data", str(text_path), "--device", "cuda", "--eval-interval", "6",
              "--warmup-iters", "3", "--min-lr", "1e-4", "--max-iters", "12", "--sample-tokens", "0"]
    from lecture_flash.gpt.train import parse_args, train
    _, eager_losses = train(parse_args([*common, "--out-dir", str(tmp_path / "eager"), "--no-cuda-graphs"]))
    _, graph_losses = train(parse_args([*common, "--out-dir", str(tmp_path / "graph"), "--cuda-graphs"]))
    train_main([*common, "--out-dir", str(tmp_path / "split"), "--cuda-graphs", "--max-iters", "6"])
    train_main([*common, "--out-dir", str(tmp_path / "split"), "--cuda-graphs", "--resume"])
    eager, graph, split = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"]
                           for d in ("eager", "graph", "split"))
    # The evaluation is captured too: its losses as the eager forward's.
    for key in ("train", "val"):
        assert graph_losses[key] == pytest.approx(eager_losses[key], rel=1e-4)
    for name in eager:
        torch.testing.assert_close(graph[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(split[name], graph[name]), name


def test_captured_calls_warm_up_capture_once_and_replay(monkeypatch):
    """gpt.step.Captured's sequence of CUDA calls, on the CPU with torch.cuda's graph API
    replaced by a recorder (the GPU test above runs the real one): WARMUP_STEPS eager calls on
    a side stream returning their own results, then one capture on static copies of the
    arguments (with the caller's generator registered, the default one not), each later call
    copying its arguments into those copies and replaying."""
    from lecture_flash.gpt import step
    log = []

    class Stream:
        def wait_stream(self, other):
            log.append("wait")

    class Graph:
        def register_generator_state(self, g):
            log.append(("register", g))

        def replay(self):
            log.append("replay")

    class Capture:
        def __init__(self, graph):
            self.graph = graph

        def __enter__(self):
            log.append("capture")

        def __exit__(self, *exc):
            log.append("end capture")

    default, own = object(), object()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "default_generators", (default,))
    seen = []

    def fn(x):
        seen.append(x.clone())
        return x * 2

    run = step.Captured(fn, generators=[None, default, own], warmup=2)
    first, second = torch.tensor([1.0]), torch.tensor([2.0])
    assert torch.equal(run(first), torch.tensor([2.0])) and torch.equal(run(second), torch.tensor([4.0]))
    out = run(torch.tensor([3.0]))  # captured (the recorder runs fn once while "capturing")
    assert torch.equal(out, torch.tensor([6.0])) and torch.equal(run.static[0], torch.tensor([3.0]))
    assert run(torch.tensor([5.0])) is out  # a replay: the graph's output, its input copied in
    assert torch.equal(run.static[0], torch.tensor([5.0]))
    assert log == ["wait", "wait"] * 2 + [("register", own), "capture", "end capture", "replay",
                                          "replay"]
    assert [float(x) for x in seen] == [1.0, 2.0, 3.0]
