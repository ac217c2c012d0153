"""The Triton backend's two choices, their process defaults, and how one call resolves them.

- deterministic: True, the backward is bitwise reproducible (dQ has its own kernel, which
  recomputes QK^T and dO V^T: 7 tile matmuls where 5 would do). False, the dK/dV kernel adds
  its share of dQ with float32 atomics instead (5 matmuls; dQ differs between runs in its last
  bits). torch.use_deterministic_algorithms(True) overrides False. Default True.
- fp32_precision: how float32 inputs are multiplied, "ieee" (full float32) or "tf32" (tensor
  cores, about 1e-3 relative error, as PyTorch's own TF32 matmuls). Default: as PyTorch's
  matmuls, from torch.get_float32_matmul_precision(): "highest" (PyTorch's default) means
  "ieee", "high" and "medium" mean "tf32". Float16 and bfloat16 inputs are not affected.

causal_attention(..., deterministic=None, fp32_precision=None) takes both; None means the
process default. The process defaults start from the environment (LECTURE_FLASH_DETERMINISTIC=0,
LECTURE_FLASH_FP32_PRECISION=ieee|tf32) and change with set_defaults, for the rest of the
process or, as a context manager, for a with-block:

    with lecture_flash.set_defaults(deterministic=False):
        loss.backward()
"""
import os

import torch

FP32_PRECISIONS = ("ieee", "tf32")
_UNSET = object()


def _check_deterministic(value, name="deterministic"):
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


def _check_fp32_precision(value, name="fp32_precision"):
    if value is not None and value not in FP32_PRECISIONS:
        raise ValueError(f"{name} must be one of {FP32_PRECISIONS} or None, got {value!r}")
    return value


def check(deterministic, fp32_precision):
    """A call's two arguments: each None or a valid value, else an error naming it."""
    _check_deterministic(deterministic)
    _check_fp32_precision(fp32_precision)


def _from_env():
    det = os.environ.get("LECTURE_FLASH_DETERMINISTIC")
    if det not in (None, "0", "1"):
        raise ValueError(f"LECTURE_FLASH_DETERMINISTIC must be 0 or 1, got {det!r}")
    prec = os.environ.get("LECTURE_FLASH_FP32_PRECISION") or None
    _check_fp32_precision(prec, "LECTURE_FLASH_FP32_PRECISION")
    return {"deterministic": det != "0", "fp32_precision": prec}


_defaults = _from_env()


class set_defaults:
    """Set the process defaults of `deterministic` (bool) and `fp32_precision` ("ieee", "tf32",
    or None to follow torch.get_float32_matmul_precision()); an argument left out keeps its
    value. Used as a context manager, the previous defaults come back when the block ends, as
    torch.set_grad_enabled does."""

    def __init__(self, *, deterministic=_UNSET, fp32_precision=_UNSET):
        if deterministic is None:
            raise TypeError("deterministic must be True or False for a default")
        changes = {}
        if deterministic is not _UNSET:
            changes["deterministic"] = _check_deterministic(deterministic)
        if fp32_precision is not _UNSET:
            changes["fp32_precision"] = _check_fp32_precision(fp32_precision)
        self._previous = dict(_defaults)
        _defaults.update(changes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _defaults.clear()
        _defaults.update(self._previous)


def resolve_deterministic(deterministic=None):
    """The backward one call gets: its own choice, else the process default; True whenever
    torch.use_deterministic_algorithms(True) is in force."""
    if deterministic is None:
        deterministic = _defaults["deterministic"]
    return deterministic or torch.are_deterministic_algorithms_enabled()


@torch.compiler.assume_constant_result  # a process setting: torch.compile reads it when tracing
def _torch_fp32_precision():
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def resolve_fp32_precision(fp32_precision=None):
    """The float32 dot precision one call gets: its own choice, else the process default, else
    what PyTorch's matmuls use."""
    if fp32_precision is None:
        fp32_precision = _defaults["fp32_precision"]
    return fp32_precision if fp32_precision is not None else _torch_fp32_precision()
