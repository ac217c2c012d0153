"""The Triton kernels (kernels/flash.py) against the float64 oracle.

On CPU these run under TRITON_INTERPRET=1 (set in conftest.py) with small shapes; on a GPU the
same tests run compiled, and the tests marked `gpu` add the large shapes.
"""
import contextlib

import pytest
import torch

from helpers import assert_by_rule, check_against_oracle, max_err
from kernels import available_backends, causal_attention
from kernels.reference import causal_attention_reference, causal_mask, naive_causal_attention

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="triton is not installed on this platform")
flash = pytest.importorskip("kernels.flash")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, H, Tq, Tk, D): awkward on purpose. Tiles under the interpreter are 16 x 16, so these
# cross tile tails, diagonals, padded head dims (1, 3, 24, 40, 80, 96, 112) and Tq < Tk.
SHAPES = [
    (1, 2, 1, 1, 8),
    (2, 1, 7, 7, 24),
    (1, 2, 100, 100, 64),
    (1, 1, 257, 257, 80),
    (1, 1, 1, 239, 40),
    (1, 1, 113, 203, 96),
    (1, 1, 37, 50, 112),
    (1, 1, 9, 9, 1),
    (1, 1, 33, 33, 3),
    (1, 1, 20, 20, 256),
]
GPU_SHAPES = [(4, 16, 4096, 4096, 128), (2, 32, 1023, 1024, 64), (8, 8, 2048, 2048, 80)]


@contextlib.contextmanager
def fp32_precision(mode):
    old = flash.get_fp32_precision()
    flash.set_fp32_precision(mode)
    try:
        yield
    finally:
        flash.set_fp32_precision(old)


def inputs(B, H, Tq, Tk, D, dtype, device):
    q = torch.randn(B, H, Tq, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, H, Tk, D, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


def run_case(shape, dtype, device):
    torch.manual_seed(sum(shape))
    # float32 is held to the fp32 rule with exact fp32 dots; the tf32 default has its own test.
    with fp32_precision("ieee"):
        check_against_oracle(*inputs(*shape, dtype, device), "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_gradients(shape, dtype, device):
    run_case(shape, dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_forward_and_gradients_large(shape, dtype, device):
    run_case(shape, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_layout_is_read_in_place(dtype, device):
    """q, k, v as strided views of one (B, T, 3, H, D) projection; the output comes back in
    (B, T, H, D) storage so the model's transpose + reshape is free."""
    torch.manual_seed(7)
    qkv = torch.randn(2, 45, 3, 3, 40, dtype=dtype, device=device)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with fp32_precision("ieee"):
        out = check_against_oracle(q, k, v, "triton")[0]
    assert out.transpose(1, 2).is_contiguous()


def test_three_dimensional_input_and_scale(device):
    torch.manual_seed(8)
    q, k, v = (torch.randn(3, 40, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = check_against_oracle(q, k, v, "triton", scale=0.3)[0]
    assert out.shape == (3, 40, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 37, 37, 24), (1, 2, 20, 45, 64)], ids=str)
def test_dropout_matches_oracle_given_the_same_mask(shape, dtype, device):
    B, H, Tq, Tk, _ = shape
    p = 0.3
    torch.manual_seed(9)
    q, k, v = inputs(*shape, dtype, device)
    torch.manual_seed(123)
    out = causal_attention(q, k, v, dropout_p=p, backend="triton")
    torch.manual_seed(123)  # the kernel drew its seed first: draw it again
    keep = flash.dropout_keep_mask(flash.draw_seed(device), B, H, Tq, Tk, p)

    def run(a, b, c):
        torch.manual_seed(123)
        return causal_attention(a, b, c, dropout_p=p, backend="triton")

    with fp32_precision("ieee"):
        got = check_against_oracle(q, k, v, "triton", dropout_p=p, keep=keep, run=run)
    if dtype == torch.bfloat16:  # the same seed gives the same mask, hence the same output
        assert torch.equal(got[0], out)


def test_dropout_keep_rate_and_reproducibility(device):
    p = 0.2
    torch.manual_seed(0)
    keep = flash.dropout_keep_mask(flash.draw_seed(device), 2, 4, 64, 96, p)
    rate = keep.float().mean().item()  # 49152 draws: 3 sigma is 0.0054
    assert abs(rate - (1 - p)) < 0.01, f"keep rate {rate:.4f}, expected {1 - p}"
    # Different heads and rows draw different masks.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    # One Philox call serves four neighbouring keys: its four draws must be independent, so
    # both-kept pairs of neighbours come at (1 - p)^2 (3 sigma of this estimate is about 0.006).
    both = (keep[..., :-1] & keep[..., 1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.012, f"neighbours both kept {both:.4f}, expected {(1 - p) ** 2}"
    q, k, v = inputs(1, 2, 30, 30, 16, torch.float32, device)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(causal_attention(q, k, v, dropout_p=p, backend="triton"))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_dropout_mask_does_not_depend_on_tiles(device):
    """The forward and the two backward kernels draw the mask in tiles of their own sizes."""
    seed = torch.tensor([1234], device=device, dtype=torch.int64)
    masks = [flash.dropout_keep_mask(seed, 1, 2, 70, 75, 0.5, block=b) for b in ((16, 16), (32, 64), (64, 32))]
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_backward_is_deterministic(device):
    torch.manual_seed(10)
    q, k, v = (t.requires_grad_() for t in inputs(2, 2, 70, 70, 32, torch.bfloat16, device))
    do = torch.randn_like(q)
    grads = [torch.autograd.grad(causal_attention(q, k, v, backend="triton"), (q, k, v), do) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_lse_is_the_row_logsumexp(device):
    torch.manual_seed(11)
    q, k, v = inputs(1, 2, 40, 52, 16, torch.float32, device)
    with fp32_precision("ieee"):
        _, lse = flash._fwd_op(q, k, v, None, 0.25, 0.0, True)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s = s.masked_fill(~causal_mask(40, 52, q.device), float("-inf"))
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=1e-5)


def test_opcheck(device):
    torch.manual_seed(12)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 19, 24, 16, torch.float32, device))
    torch.library.opcheck(flash._fwd_op, (q, k, v, None, 0.25, 0.0, True))
    seed = flash.draw_seed(device)
    torch.library.opcheck(flash._fwd_op, (q, k, v, seed, 0.25, 0.1, True))
    # The backward op has no derivative of its own (no double backward): check it without grads.
    q, k, v = (t.detach() for t in (q, k, v))
    o, lse = flash._fwd_op(q, k, v, None, 0.25, 0.0, True)
    torch.library.opcheck(flash._bwd_op, (torch.randn_like(o), q, k, v, o, lse, None, 0.25, 0.0, True))


def test_compiles_without_graph_breaks(device):
    torch.manual_seed(13)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 33, 33, 16, torch.bfloat16, device))

    def f(q, k, v):
        return causal_attention(q, k, v, dropout_p=0.1, backend="triton").float().square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    torch.manual_seed(0)
    # Inductor draws its own random numbers unless told to use eager's; the dropout seed is
    # one, and the comparison below needs the same mask in both runs.
    with torch._inductor.config.patch(fallback_random=True):
        loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.manual_seed(0)
    expect = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(grads, expect):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(1, 2, 100, 100, 64), (1, 1, 37, 50, 40)], ids=str)
def test_tf32_default_is_within_pytorch_tf32_error(shape, device):
    """float32 by default multiplies in tf32; held to PyTorch's own TF32 error. On CPU the
    baseline rounds matmul operands to tf32 as the tensor cores do, and so does the kernel."""
    torch.manual_seed(14)
    with fp32_precision("tf32"):
        check_against_oracle(*inputs(*shape, torch.float32, device), "triton")


@pytest.mark.gpu
def test_tf32_matches_cublas_tf32_error(device):
    torch.manual_seed(14)
    q, k, v = inputs(2, 4, 1000, 1000, 64, torch.float32, device)
    with fp32_precision("tf32"):
        got = causal_attention(q, k, v, backend="triton")
    ref = causal_attention_reference(q.double(), k.double(), v.double())
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        low = naive_causal_attention(q, k, v, 64**-0.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_by_rule([got], [ref], [low], names=("out",))


@pytest.mark.gpu
def test_offsets_past_int32(device):
    """More than 2**31 elements per tensor: the batch/head offsets must be 64-bit."""
    B, H, T, D = 1, 4100, 4096, 128  # 2.15e9 elements
    free = torch.cuda.mem_get_info()[0]
    if free < 4 * B * H * T * D * 2 * 1.1:
        pytest.skip(f"needs {4 * B * H * T * D * 2 / 2**30:.0f} GiB of free GPU memory")
    torch.manual_seed(15)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    out = causal_attention(q, k, v, backend="triton")
    last = slice(H - 2, H)
    ref = causal_attention_reference(q[:, last], k[:, last], v[:, last])
    assert max_err(out[:, last], ref) < 0.02
    del q, k, v, out


def test_untuned_launch_falls_back_to_a_config_that_loads():
    """With autotuning off, a config this GPU cannot hold (an A100 has 163 KB of shared memory
    per block, an RTX 4090 99 KB) gives way to the next one that fits the problem."""
    OutOfResources = pytest.importorskip("triton.runtime.errors").OutOfResources
    tried = []

    def run(conf):
        tried.append(conf.kwargs["BLOCK_M"])
        if conf.kwargs["BLOCK_M"] > 32:
            raise OutOfResources(300_000, 232_448, "shared memory")

    chosen = flash._first_that_loads(flash._CONFIGS["dq"], run)
    assert chosen.kwargs["BLOCK_M"] == 32 and tried == [128, 128, 64, 32]

    def broken(conf):
        raise ValueError("a real error")

    with pytest.raises(ValueError, match="a real error"):  # only "too big" moves on
        flash._first_that_loads(flash._CONFIGS["dq"], broken)


def test_untuned_launch_path(monkeypatch):
    """The launcher's GPU path with autotuning off (CPU tests otherwise take the interpreter's
    fixed tile): grid, config arguments, and the choice remembered per specialisation."""
    launches = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((grid, kw["BLOCK_M"], kw["num_warps"]))

    monkeypatch.setattr(flash, "INTERPRET", False)
    monkeypatch.setattr(flash, "AUTOTUNE", False)
    monkeypatch.setattr(flash, "_JIT", {"dq": FakeKernel()})
    monkeypatch.setattr(flash, "_FIXED", {})
    q = torch.empty(2, 3, 300, 64, dtype=torch.bfloat16)
    meta = dict(TQ_BUCKET=512, TK_BUCKET=512, HEAD_DIM=64, DROPOUT=False, DOT_PRECISION="ieee")
    for _ in range(2):
        flash._launch("dq", (300, "BLOCK_M", 6), (q,), meta)
    assert launches == [((3, 6), 128, 8)] * 2  # the first dq config: 300 rows in tiles of 128
    assert list(flash._FIXED.values()) == [flash._CONFIGS["dq"][0]]
