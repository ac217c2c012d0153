import pytest
import torch

from lecture_flash.gpt import data
from lecture_flash.gpt.data import Batches, CharTokenizer, DataError, load_text


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


def test_a_damaged_cached_download_is_fetched_again(tmp_path, monkeypatch):
    """The cached copy is checked (size, sha256) on every use, not once: a truncated file is
    replaced by a fresh download instead of being trained on."""
    import hashlib
    monkeypatch.delenv("GPT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "source.txt"
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    payload = source.read_bytes()
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", source.as_uri())
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_BYTES", len(payload))
    assert load_text() == source.read_text()  # downloaded into the cache
    cached = data.cache_dir() / "tinyshakespeare.txt"
    cached.write_bytes(payload[:100])  # an interrupted copy, a full disk...
    assert load_text() == source.read_text()
    assert cached.read_bytes() == payload


def test_text_that_is_not_utf8_or_not_a_file(tmp_path, monkeypatch):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("naïve café".encode("latin-1"))
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 0xef at offset 2\)"):
        load_text(latin)
    with pytest.raises(DataError, match="is a directory"):
        load_text(tmp_path)
    monkeypatch.setenv("GPT_DATA", str(tmp_path / "nowhere.txt"))
    with pytest.raises(DataError, match="GPT_DATA: data file .*nowhere.txt does not exist"):
        load_text()
