"""gpt/checkpoint.py: loading never runs code, writing never loses data; both command lines
report a bad file in one line."""
import os

import pytest
import torch

from lecture_flash.gpt import checkpoint
from helpers import cli_error
from lecture_flash.gpt.sample import main as sample_main
from lecture_flash.gpt.train import main as train_main


class _RunsCode:
    """Pickles to a call of os.system: what a crafted checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, text_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": _RunsCode(marker), "config": {}, "tokenizer": {"chars": "ab"}}, out / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match="could run code"):
        checkpoint.load(out / "ckpt.pt")
    assert "could run code" in cli_error(sample_main, "--ckpt", out / "ckpt.pt")
    assert "could run code" in cli_error(train_main, "--preset", "tiny", "--data", text_path,
                                        "--out-dir", out, "--resume", "--no-progress")
    assert not marker.exists()


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("0.5 1.5\nnot a checkpoint\n"), "not a whole file written by torch.save"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: (torch.save({"a": torch.ones(1000)}, p),
                p.write_bytes(p.read_bytes()[:200])), "not a whole file written by torch.save"),
    (lambda p: torch.save([1, 2, 3], p), "neither a lecture-flash-train checkpoint nor a model state dict"),
], ids=["empty", "text", "directory", "truncated", "a list"])
def test_sample_names_a_bad_checkpoint_in_one_line(tmp_path, make, words):
    path = tmp_path / "ckpt.pt"
    make(path)
    assert words in cli_error(sample_main, "--ckpt", path)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_text("0.5 1.5\nnot a checkpoint\n"), "it holds text ('0.5 1.5'...), not a zip archive"),
    (lambda p: p.write_bytes(bytes(range(256))), "its first bytes are not those of a zip archive"),
    (lambda p: (torch.save({"a": torch.ones(1000)}, p), p.write_bytes(p.read_bytes()[:200])),
     "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
     "directory."),
], ids=["text", "binary", "truncated"])
def test_an_unreadable_checkpoint_is_named_with_a_whole_reason(tmp_path, make, reason):
    """Not PyTorch's paragraph about weights_only cut at 100 characters mid-word: what the file
    is, or the first sentence of the innermost error."""
    path = tmp_path / "ckpt.pt"
    make(path)
    line = cli_error(sample_main, "--ckpt", path)
    assert line.endswith(f"is not a whole file written by torch.save (cut short, or something "
                         f"else): {reason}"), line
    assert "\n" not in line and "weights_only" not in line, line


def test_resume_needs_a_train_checkpoint(tmp_path):
    torch.save({"model": {}, "iter": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a lecture-flash-train checkpoint: it has no 'optimizer'"):
        checkpoint.load_train_checkpoint(tmp_path / "ckpt.pt")


def test_save_replaces_atomically_and_start_cleans_what_a_crash_left(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"iter": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def crash(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"iter": 2})
    monkeypatch.undo()
    assert torch.load(path)["iter"] == 1  # the old checkpoint stands
    assert checkpoint.stale_temporaries(path) == []  # and the failed write cleaned up after itself
    (tmp_path / "ckpt.pt.abc123.tmp").write_bytes(b"left by a kill -9")
    assert len(checkpoint.stale_temporaries(path)) == 1
    assert checkpoint.remove_stale_temporaries(path) == 1 and checkpoint.stale_temporaries(path) == []
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    checkpoint.save(path, {"iter": 3})
    assert len(synced) == 2  # the file, then its folder, before and after the rename
    assert torch.load(path)["iter"] == 3
