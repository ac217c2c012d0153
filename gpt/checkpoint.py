"""Checkpoints that load without running code and are never left half-written.

save() writes to a temporary file in the same folder, fsyncs it, renames it over the old one and
fsyncs the folder, so a crash at any point leaves either the old checkpoint or the new one.
load() uses torch.load(weights_only=True): tensors and plain Python values only, so a crafted
file cannot run code; anything else is refused with one line that names the file.
"""
import contextlib
import os
import pickle
import tempfile
from pathlib import Path

import torch

# What lecture-flash-train writes; a file without these is not one of its checkpoints.
TRAIN_KEYS = ("model", "optimizer", "config", "iter", "tokenizer", "rng", "train_args")


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message is one line naming the file."""


def _tmp_prefix(path):
    return path.name + "."


def stale_temporaries(path):
    """Temporary files an interrupted save() of `path` left behind."""
    return sorted(path.parent.glob(_tmp_prefix(path) + "*.tmp"))


def remove_stale_temporaries(path):
    """Delete what interrupted saves of `path` left behind; returns how many."""
    stale = stale_temporaries(path)
    for tmp in stale:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return len(stale)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open a folder (Windows): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, obj):
    """torch.save(obj) to `path`, atomically and durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load(path):
    """The object saved at `path`, loaded with weights_only=True, or a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # it names a callable to import: what a crafted file does
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain values, which could run code "
                "when loaded; refused (load it yourself with torch.load(weights_only=False) only "
                "if you trust where it came from)") from None
        raise CheckpointError(_unreadable(path, e)) from None
    except Exception as e:  # truncated, a text file, ...
        raise CheckpointError(_unreadable(path, e)) from None


def load_train_checkpoint(path):
    """A checkpoint written by lecture-flash-train, checked for everything a resume needs."""
    obj = load(path)
    missing = [k for k in TRAIN_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a lecture-flash-train checkpoint: it has no "
                              + ", ".join(repr(k) for k in missing))
    return obj


def _unreadable(path, e):
    """One line saying why torch.load could not read `path`: the file's kind where it is not
    what torch.save writes (a zip archive, or a legacy pickle), else the innermost error's
    first sentence (torch's weights_only errors wrap it in a paragraph about that option)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        text = head.decode("utf-8", errors="replace")
        if text.strip() and "".join(text.split()).isprintable():
            reason = f"it holds text ({text.splitlines()[0][:40]!r}...), not a zip archive"
        else:
            reason = "its first bytes are not those of a zip archive"
    else:
        cause = e.__context__ if "Weights only load failed" in str(e) and e.__context__ else e
        reason = f"{type(cause).__name__}: {_first_sentence(str(cause))}".rstrip(": ")
    return f"{path} is not a whole file written by torch.save (cut short, or something else): {reason}"


def _first_sentence(text, limit=160):
    """The first line of text up to its first sentence's end, or cut at a word within `limit`
    characters (never mid-word)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    end = line.find(". ", 0, limit)
    if end > 0:
        return line[:end + 1]
    return line[:line.rfind(" ", 0, limit)] + " ..."
