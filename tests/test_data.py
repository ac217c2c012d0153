import os

import pytest
import torch

from gpt import data
from gpt.data import Batches, CharTokenizer, DataError, load_text


def test_tokenizer_round_trip_and_state():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8 and tok.chars == sorted(set("hello world"))
    assert tok.decode(tok.encode("hello")) == "hello"
    again = CharTokenizer.from_state_dict(tok.state_dict())
    assert again.encode("world") == tok.encode("world")


def test_unknown_character_is_named():
    with pytest.raises(ValueError, match="'z'"):
        CharTokenizer.from_text("abc").encode("abz")


def test_load_text_from_path_env_and_errors(tmp_path, monkeypatch, text_path):
    assert load_text(text_path)
    monkeypatch.setenv("GPT_DATA", str(text_path))
    assert load_text() == load_text(text_path)
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_text(empty)


def test_offline_download_says_to_pass_data(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", "http://127.0.0.1:9/none")
    with pytest.raises(DataError, match="pass --data"):
        load_text()


def test_download_is_checksummed(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bogus = tmp_path / "bogus.txt"
    bogus.write_text("not shakespeare")
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", bogus.as_uri())
    with pytest.raises(DataError, match="sha256"):
        load_text()


def test_batches_split_shift_and_generator():
    text = list(range(1000))
    b = Batches(text, block_size=8, batch_size=4, seed=0)
    assert len(b.splits["train"]) == 900 and len(b.splits["val"]) == 100
    x, y = b.get("train")
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    state = b.generator.get_state()
    first = b.get("val")[0]
    b.generator.set_state(state)
    assert torch.equal(b.get("val")[0], first)
    g = torch.Generator().manual_seed(5)
    b.get("train", generator=g)  # a separate generator leaves the sampler's stream alone
    b.generator.set_state(state)
    assert torch.equal(b.get("val")[0], first)


def test_too_little_text():
    with pytest.raises(DataError, match="fewer than"):
        Batches(list(range(50)), block_size=8, batch_size=2)
