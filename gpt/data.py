"""Character tokenizer, text loading (path, $GPT_DATA, or a checked download) and batches."""
import hashlib
import os
import urllib.request
from pathlib import Path

import torch

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_BYTES = 1115394
ENV_VAR = "GPT_DATA"


class DataError(Exception):
    """A problem with the text a user pointed us at; its message is one line, meant for them."""


class CharTokenizer:
    """The lecture's tokenizer: every distinct character of the text, sorted, is one token."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s):
        try:
            return [self.stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def state_dict(self):
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["chars"])


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lecture-flash"


def _is_tiny_shakespeare(path):
    """Whether the file at path is Tiny Shakespeare, whole (size, then sha256: about 2 ms)."""
    try:
        if path.stat().st_size != TINY_SHAKESPEARE_BYTES:
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    except OSError:
        return False


def _download_tiny_shakespeare():
    """The cached copy, checked on every use; downloaded (again) when missing or not whole."""
    target = cache_dir() / "tinyshakespeare.txt"
    if _is_tiny_shakespeare(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r:
            payload = r.read()
    except OSError as e:
        raise DataError(f"could not download Tiny Shakespeare ({e}); pass --data PATH "
                        f"or set {ENV_VAR}") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"downloaded Tiny Shakespeare has sha256 {digest}, expected "
                        f"{TINY_SHAKESPEARE_SHA256}; pass --data PATH")
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, target)
    return target


def load_text(path=None):
    """The training text: `path`, else $GPT_DATA, else Tiny Shakespeare (downloaded once)."""
    where = "data file"
    if not path and os.environ.get(ENV_VAR):
        path, where = os.environ[ENV_VAR], f"{ENV_VAR}: data file"
    path = Path(path or _download_tiny_shakespeare())
    if path.is_dir():
        raise DataError(f"{where} {path} is a directory, not a text file")
    if not path.is_file():
        raise DataError(f"{where} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                        f"offset {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {where} {path}: {e.strerror or e}") from None
    if not text:
        raise DataError(f"{where} {path} is empty")
    return text


class Batches:
    """The lecture's get_batch: random windows of block_size + 1 tokens from a 90/10 split.

    Offsets come from this object's own generator, so a checkpoint can save and restore it and
    evaluation (which uses a separate generator) never disturbs the training stream.
    """

    def __init__(self, data, block_size, batch_size, device="cpu", seed=1337, val_fraction=0.1,
                 rank=0, world_size=1):
        data = torch.as_tensor(data, dtype=torch.long)
        n = int((1 - val_fraction) * len(data))
        self.splits = {"train": data[:n], "val": data[n:]}
        for name, split in self.splits.items():
            if len(split) <= block_size:
                raise DataError(f"the {name} split has {len(split)} tokens, fewer than "
                                f"block_size + 1 = {block_size + 1}; use more text or a smaller block")
        self.block_size, self.batch_size, self.device = block_size, batch_size, torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def get(self, split, generator=None):
        """(x, y): two (batch_size, block_size) tensors, y shifted by one, on the device. With
        world_size processes (data-parallel training), every process draws the same
        world_size * batch_size windows from its own generator, seeded alike, and keeps its
        rank's share: together they train on what one process with world_size times the batch
        would."""
        data = self.splits[split]
        g = generator if generator is not None else self.generator
        ix = torch.randint(len(data) - self.block_size, (self.batch_size * self.world_size,), generator=g)
        ix = ix[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        x = torch.stack([data[i:i + self.block_size] for i in ix])
        y = torch.stack([data[i + 1:i + self.block_size + 1] for i in ix])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)
