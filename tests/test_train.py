"""Training, checkpoints, exact resume, and the command lines, run as a user runs them."""
import subprocess
import sys

import torch

from gpt.train import main as train_main

TINY = ["--preset", "tiny", "--n-embd", "16", "--n-layer", "1", "--batch-size", "4",
        "--block-size", "16", "--eval-iters", "2", "--no-progress", "--sample-tokens", "20"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_training_lowers_the_loss(tmp_path, text_path):
    from gpt.train import parse_args, train
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
    r = run_cli("gpt.train", *TINY, "--data", str(text_path), "--out-dir", str(tmp_path), "--max-iters", "3")
    assert r.returncode == 0, r.stderr
    assert "val loss" in r.stdout and (tmp_path / "ckpt.pt").is_file()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert set(ckpt) >= {"model", "optimizer", "config", "iter", "tokenizer", "rng"}
    assert set(ckpt["rng"]) == {"torch", "cuda", "data"}
    r = run_cli("gpt.sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO", "--max-new-tokens", "30",
                "--seed", "1", "--top-k", "5", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO") and len(r.stdout) >= 30 and "tokens/s" in r.stderr
    again = run_cli("gpt.sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "ROMEO", "--max-new-tokens", "30",
                    "--seed", "1", "--top-k", "5", "--top-p", "0.9")
    assert again.stdout == r.stdout  # a seed reproduces the text


def test_sample_from_a_raw_lecture_state_dict(tmp_path, text_path):
    from gpt.data import CharTokenizer, load_text
    from gpt.lecture import GPTLanguageModel
    vocab = CharTokenizer.from_text(load_text(text_path)).vocab_size
    torch.save(GPTLanguageModel(vocab, block_size=16, n_embd=16, n_head=2, n_layer=1).state_dict(), tmp_path / "lec.pt")
    r = run_cli("gpt.sample", "--ckpt", str(tmp_path / "lec.pt"), "--vocab-from", str(text_path), "--block-size", "16",
                "--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--max-new-tokens", "20", "--stop", "e")
    assert r.returncode == 0, r.stderr
    r = run_cli("gpt.sample", "--ckpt", str(tmp_path / "lec.pt"))
    assert r.returncode != 0 and "--vocab-from" in r.stderr and "Traceback" not in r.stderr


def test_cli_errors_are_one_line(tmp_path, text_path):
    cases = [
        (["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)], "does not exist"),
        (["--data", str(text_path), "--out-dir", str(tmp_path / "fresh"), "--resume"], "no checkpoint"),
        (["--data", str(text_path), "--out-dir", "/proc/forbidden"], "cannot write to out-dir"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases.append((["--data", str(empty), "--out-dir", str(tmp_path)], "is empty"))
    for args, words in cases:
        r = run_cli("gpt.train", *TINY, *args)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
