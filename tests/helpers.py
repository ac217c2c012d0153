"""check_against_oracle: a backend's output and gradients held to the tolerance rule
(kernels/testing.py) against the float64 oracle, with PyTorch's own math attention in the same
precision as the baseline.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lecture_flash import causal_attention, settings
from lecture_flash.reference import (causal_attention_reference, causal_mask, key_length_mask,
                                     naive_causal_attention, naive_packed_attention)
from lecture_flash.testing import assert_by_rule
from lecture_flash.validation import kv_heads_expanded


# Subprocesses run from a folder outside the repository, as a user's would: the repository root
# holds a folder named kernels/, which would shadow Hugging Face's `kernels` package there.
OUTSIDE = Path(tempfile.mkdtemp(prefix="lecture-flash-cwd-"))


def run_module(module, *args, env=None, cwd=OUTSIDE, timeout=300):
    """python -m MODULE ARGS, as a user runs it: from a folder outside the repository, the
    installed package imported (nothing put on sys.path)."""
    env = {**(os.environ if env is None else env)}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def _grads(fn, inputs, do):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, inputs, do.to(out.dtype))]


def round_tf32(x):
    """float32 -> nearest tf32 value (ties to even), as a tensor core sees a rounded operand."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + (0xFFF + ((bits >> 13) & 1))) & -8192  # -8192 == 0xFFFFE000
    return bits.view(torch.float32)


class _TF32MatMul(torch.autograd.Function):
    """a @ b with every operand, forward and backward, rounded to tf32 (as cuBLAS TF32 does)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return round_tf32(a) @ round_tf32(b)

    @staticmethod
    def backward(ctx, g):
        a, b = (round_tf32(t) for t in ctx.saved_tensors)
        g = round_tf32(g)
        return g @ b.transpose(-2, -1), a.transpose(-2, -1) @ g


def tf32_naive_attention(q, k, v, scale, dropout_p=0.0, keep=None, window=None):
    """PyTorch's math attention as TF32 matmuls compute it: each matmul operand rounded to tf32."""
    mm = _TF32MatMul.apply
    k, v = kv_heads_expanded(k, q.shape[1]), kv_heads_expanded(v, q.shape[1])
    s = mm(q, k.transpose(-2, -1)) * scale
    s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device,
                                   None if window is None else window[0]), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return mm(p, v)


def uses_tf32(q, backend, fp32_precision=None):
    """Whether `backend` multiplies these float32 inputs in tf32 (the Triton kernel, when the
    call or the process default says so)."""
    if q.dtype != torch.float32 or backend not in ("triton", "auto"):
        return False
    if backend == "auto" and q.device.type != "cuda":
        return False
    return settings.resolve_fp32_precision(fp32_precision) == "tf32"


def check_against_oracle(q, k, v, backend, scale=None, dropout_p=0.0, keep=None, run=None,
                         tf32=None, window=None, rows=None, **options):
    """Run `backend` (or `run(q, k, v)`) on q, k, v and hold output and grads to the rule.
    options (deterministic, fp32_precision) go to causal_attention. rows: seqlens_k, or
    cu_seqlens_q and cu_seqlens_k (packed q, k, v) and the max lengths, as causal_attention
    takes them; PyTorch's math baseline then runs under the same mask.

    For float32 in tf32 mode the baseline is PyTorch's math with TF32 matmuls, as the rule says:
    PyTorch's own error at the same precision. tf32=True/False picks the baseline instead of
    the settings.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    rows = rows or {}
    if run is None:
        def run(q_, k_, v_):
            return causal_attention(q_, k_, v_, scale=scale, dropout_p=dropout_p, backend=backend,
                                    window=window, **rows, **options)
    got = _grads(run, (q, k, v), do)
    ref64 = _grads(lambda a, b, c: causal_attention_reference(
        a, b, c, scale=scale, dropout_p=dropout_p, dropout_mask=keep, window=window, **rows),
        [x.double() for x in (q, k, v)], do.double())
    if tf32 is None:
        tf32 = uses_tf32(q, backend, options.get("fp32_precision"))
    if rows:
        assert not tf32, "the tf32 baseline has no per-row masks"
        low = _grads(lambda a, b, c: naive_with_rows(a, b, c, scale, dropout_p, keep, window, rows),
                     (q, k, v), do)
    else:
        baseline = tf32_naive_attention if tf32 else naive_causal_attention
        low = _grads(lambda a, b, c: baseline(a, b, c, scale, dropout_p, keep, window), (q, k, v), do)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
    assert_by_rule(got, ref64, low)
    return got


def naive_with_rows(q, k, v, scale, dropout_p, keep, window, rows):
    """PyTorch's math attention in the inputs' dtype under per-row key lengths or packed
    sequences (rows as check_against_oracle takes it): the baseline of the rule for them."""
    left = None if window is None else window[0]
    if "seqlens_k" in rows:
        mask = key_length_mask(q, k, rows["seqlens_k"], left)
        return naive_causal_attention(q, k, v, scale, dropout_p, keep, mask=mask)
    return naive_packed_attention(q, k, v, rows["cu_seqlens_q"], rows["cu_seqlens_k"], scale,
                                  dropout_p, keep, window)


def cli_error(main, *argv):
    """Run a command line's main() in this process (a subprocess costs seconds of imports) and
    return the one line it exits with: main() turns every problem a user can fix into
    SystemExit("error: ...")."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message
