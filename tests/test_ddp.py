"""Data-parallel training (torchrun + DistributedDataParallel) on CPU: two gloo processes."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import OUTSIDE
from lecture_flash.gpt import checkpoint
from lecture_flash.gpt import train as train_cli

# The tiny preset, no dropout unless a test adds it, a few steps: every process's share counts.
RUN = ["--preset", "tiny", "--max-iters", "8", "--eval-interval", "4", "--eval-iters", "2",
       "--sample-tokens", "0", "--no-progress", "--device", "cpu"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(text_path):
    env = {**os.environ, "GPT_DATA": str(text_path), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("PYTHONPATH", None)  # the model's attention runs PyTorch's SDPA on CPU anyway
    return env


def torchrun(text_path, *argv, nproc=2):
    """python -m torch.distributed.run --nproc_per_node=nproc -m lecture_flash.gpt.train ARGV; its
    stdout."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), "-m", "lecture_flash.gpt.train",
                        *map(str, argv)],
                       env=_env(text_path), capture_output=True, text=True, timeout=300, cwd=OUTSIDE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def ranks(text_path, *argv, nproc=2):
    """The processes torchrun would start, started here with its environment (RANK,
    WORLD_SIZE, MASTER_ADDR, ...), without its agent process: a few seconds less per run."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "lecture_flash.gpt.train", *map(str, argv)], cwd=OUTSIDE,
                              env={**_env(text_path), "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(nproc)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    return outs[0][0]


def eval_losses(stdout):
    return [(int(a), float(b), float(c)) for a, b, c in
            re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", stdout)]


def weights(out_dir):
    return checkpoint.load_train_checkpoint(Path(out_dir) / "ckpt.pt")["model"]


def test_two_processes_at_batch_b_train_as_one_at_2b(text_path, tmp_path, capsys):
    """DDP over 2 gloo processes at batch 4 against one process at batch 8: the same loss
    curve (rank 0's evaluations, logged once) and the same weights, within float tolerance."""
    out = torchrun(text_path, *RUN, "--batch-size", "4", "--out-dir", tmp_path / "ddp")
    train_cli.main([*RUN, "--batch-size", "8", "--data", str(text_path), "--out-dir",
                    str(tmp_path / "one")])
    one = capsys.readouterr().out
    assert "2 processes" in out and out.count("step 8:") == 1  # rank 0 alone logs
    ddp_curve, one_curve = eval_losses(out), eval_losses(one)
    assert [s for s, _, _ in ddp_curve] == [0, 4, 8] == [s for s, _, _ in one_curve]
    for (_, a, b), (_, c, d) in zip(ddp_curve, one_curve):
        assert abs(a - c) < 2e-4 and abs(b - d) < 2e-4, (ddp_curve, one_curve)
    got, want = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(text_path, tmp_path):
    """With dropout (each process its own draws) and an lr schedule: 8 steps straight, against
    4 steps then --resume to 8. Every rank's random state comes back from the checkpoint, so
    the weights are bitwise the same."""
    run = [*RUN, "--batch-size", "4", "--dropout", "0.2", "--warmup-iters", "3", "--min-lr", "1e-4"]
    ranks(text_path, *run, "--out-dir", tmp_path / "straight")
    ranks(text_path, *run, "--max-iters", "4", "--out-dir", tmp_path / "resumed")
    ranks(text_path, *run, "--resume", "--out-dir", tmp_path / "resumed")
    got, want = weights(tmp_path / "resumed"), weights(tmp_path / "straight")
    assert all(torch.equal(got[name], want[name]) for name in want)


# Context parallelism: every sequence sharded over a group of processes (gpt/context.py).

def _same_run(got_out, got_dir, want_out, want_dir):
    got_curve, want_curve = eval_losses(got_out), eval_losses(want_out)
    assert [s for s, _, _ in got_curve] == [0, 4, 8] == [s for s, _, _ in want_curve]
    for (_, a, b), (_, c, d) in zip(got_curve, want_curve):
        assert abs(a - c) < 2e-4 and abs(b - d) < 2e-4, (got_curve, want_curve)
    got, want = weights(got_dir), weights(want_dir)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_context_parallel_trains_as_one_process(text_path, tmp_path, capsys):
    """torchrun --context-parallel 2: each sequence of a batch of 4 split over 2 processes
    (zigzag shards, the ring's attention) trains as one process at batch 4: the same loss curve
    and weights within float tolerance."""
    out = torchrun(text_path, *RUN, "--batch-size", "4", "--context-parallel", "2",
                   "--out-dir", tmp_path / "cp")
    train_cli.main([*RUN, "--batch-size", "4", "--data", str(text_path), "--out-dir",
                    str(tmp_path / "one")])
    assert "(1 data-parallel x 2 context-parallel)" in out
    _same_run(out, tmp_path / "cp", capsys.readouterr().out, tmp_path / "one")


def test_context_and_data_parallel_together(text_path, tmp_path, capsys):
    """4 processes, 2 data-parallel groups of 2 context-parallel ones, at batch 4 each: as one
    process at batch 8."""
    out = ranks(text_path, *RUN, "--batch-size", "4", "--context-parallel", "2", "--out-dir",
                tmp_path / "cp", nproc=4)
    train_cli.main([*RUN, "--batch-size", "8", "--data", str(text_path), "--out-dir",
                    str(tmp_path / "one")])
    assert "(2 data-parallel x 2 context-parallel)" in out
    _same_run(out, tmp_path / "cp", capsys.readouterr().out, tmp_path / "one")


def test_context_parallel_resumes_exactly(text_path, tmp_path):
    """With dropout (the ring's attention's included; each rank its own draws):
    4 steps then --resume to 8 ends with the weights of 8 straight, bitwise. (Two processes:
    with four, gloo's all-reduce adds four values in an order that follows DDP's buckets, which
    it rebuilds after a process's first step, so a restarted run rounds differently, 1e-8.)"""
    run = [*RUN, "--batch-size", "4", "--context-parallel", "2", "--dropout", "0.2"]
    ranks(text_path, *run, "--out-dir", tmp_path / "straight")
    ranks(text_path, *run, "--max-iters", "4", "--out-dir", tmp_path / "resumed")
    ranks(text_path, *run, "--resume", "--out-dir", tmp_path / "resumed")
    got, want = weights(tmp_path / "resumed"), weights(tmp_path / "straight")
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_context_parallel_attention_takes_the_modules_dropout(monkeypatch):
    """The ring gets the attention's dropout in training, none in eval."""
    from lecture_flash.gpt import GPT, GPTConfig, context
    calls = []
    monkeypatch.setattr(context, "ring_attention", lambda q, k, v, **kw: (calls.append(kw), q)[1])
    cp = context.ContextParallel(group=None, world=1, rank=0)
    idx = torch.zeros(2, 8, dtype=torch.long)
    for dropout, train, want in ((0.2, True, 0.2), (0.2, False, 0.0), (0.0, True, 0.0)):
        model = GPT(GPTConfig.from_preset("tiny", dropout=dropout)).train(train)
        calls.clear()
        cp.forward(model, idx)
        assert len(calls) == 2 and all(kw == dict(group=None, scale=None, dropout_p=want)
                                       for kw in calls)


def test_context_parallel_is_refused_where_it_cannot_run(text_path):
    from helpers import cli_error
    assert "--context-parallel runs eager" in cli_error(
        train_cli.main, *RUN, "--context-parallel", "2", "--compile", "--data", str(text_path))
    assert "must be at least 1" in cli_error(
        train_cli.main, *RUN, "--context-parallel", "0", "--data", str(text_path))
    assert "must divide the number of processes (1" in cli_error(
        train_cli.main, *RUN, "--context-parallel", "2", "--data", str(text_path))
