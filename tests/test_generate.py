"""Generation is exact: the lecture's distribution, through the KV cache and past block_size."""
import pytest
import torch
import torch.nn.functional as F

from lecture_flash.gpt import GPT, GPTConfig
from lecture_flash.gpt.generate import (KVCache, decode_one_token, decode_one_token_static, draw, net_of, prefill,
                                        sample)
from lecture_flash.gpt.lecture import GPTLanguageModel


def pair(block_size, n_layer=2):
    cfg = dict(vocab_size=65, block_size=block_size, n_embd=32, n_head=4, n_layer=n_layer, dropout=0.0)
    torch.manual_seed(block_size)
    lecture = GPTLanguageModel(**cfg).double().eval()
    ours = GPT(GPTConfig(**cfg)).double().eval()
    ours.load_state_dict(lecture.state_dict())
    return lecture, ours


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("prompt_len", [1, 5, 40])
def test_greedy_equals_the_lecture_token_for_token(block_size, prompt_len):
    lecture, ours = pair(block_size)
    idx = torch.randint(65, (2, prompt_len))
    expect = idx
    for _ in range(3 * block_size):  # the lecture's generate, with argmax for multinomial
        logits, _ = lecture(expect[:, -block_size:])
        expect = torch.cat([expect, logits.view(2, -1, 65)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate(idx, 3 * block_size, temperature=0), expect)
    assert torch.equal(ours.generate(idx, 3 * block_size, top_k=1), expect)


def oracle_generate(model, idx, n, generator, **kw):
    """Sample from the oracle's probabilities: the full window each step, reference attention."""
    for blk in model.blocks:
        blk.sa.backend = "reference"
    try:
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, sample(logits[:, -1], generator=generator, **kw)], dim=1)
    finally:
        for blk in model.blocks:
            blk.sa.backend = "auto"
    return idx


@pytest.mark.parametrize("kw", [{}, dict(temperature=0.7), dict(top_k=10), dict(top_p=0.8),
                                dict(temperature=1.3, top_k=20, top_p=0.95)], ids=str)
def test_sampling_matches_the_oracle_with_the_same_generator(kw):
    _, ours = pair(8)
    idx = torch.randint(65, (3, 2))
    got = ours.generate(idx, 30, generator=torch.Generator().manual_seed(7), **kw)
    expect = oracle_generate(ours, idx, 30, torch.Generator().manual_seed(7), **kw)
    assert torch.equal(got, expect)
    assert torch.equal(ours.generate(idx, 30, seed=7, **kw), got)


def test_default_sampling_is_the_lecture_generate():
    lecture, ours = pair(8)
    idx = torch.randint(65, (1, 3))
    expect = lecture.generate(idx, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.generate(idx, 30, generator=torch.Generator().manual_seed(3)), expect)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = F.softmax(logits, -1)[0]
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        assert sample(logits, top_k=2, generator=g).item() in (0, 1)
        # top_p just above p0 keeps the two likeliest; p0 itself keeps only the first
        assert sample(logits, top_p=probs[0].item() + 1e-3, generator=g).item() in (0, 1)
        assert sample(logits, top_p=probs[0].item() * 0.999, generator=g).item() == 0


def test_prompts_of_different_lengths():
    _, ours = pair(8)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [7, 8, 9]]
    outs = ours.generate(prompts, 12, temperature=0)
    for p, out in zip(prompts, outs):
        alone = ours.generate(torch.tensor([p]), 12, temperature=0)[0]
        assert torch.equal(out, alone)


def test_stop_sequence_ends_generation():
    _, ours = pair(8)
    idx = torch.tensor([[1]])
    full = ours.generate(idx, 40, temperature=0)
    stop = full[0, 5:7].tolist()
    out = ours.generate(idx, 40, temperature=0, stop=stop)
    assert out.shape[1] < full.shape[1] and out[0, -2:].tolist() == stop


def test_static_decode_step_equals_the_eager_one():
    """The CUDA-graph step (full cache, masked) against the eager step (sliced cache)."""
    _, ours = pair(16)
    x = torch.randint(65, (2, 9))
    with torch.no_grad():
        eager, static = (KVCache(ours, 2, "cpu", torch.float64) for _ in range(2))
        net = net_of(ours)
        prefill(net, x[:, :8], eager), prefill(net, x[:, :8], static)
        a = decode_one_token(net, x[:, 8:9], 8, eager)
        b = decode_one_token_static(net, x[:, 8:9], torch.tensor([8]), static)
        full = ours(x)[0][:, -1]
    torch.testing.assert_close(a, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, full, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_cuda_graphs_generate_exactly(device):
    _, ours = pair(32)
    ours = ours.float().to(device)
    idx = torch.randint(65, (2, 3), device=device)
    eager = ours.generate(idx, 100, temperature=0, cuda_graphs=False)
    graphed = ours.generate(idx, 100, temperature=0, cuda_graphs=True)
    assert torch.equal(eager, graphed)
    # Sampling runs inside the graphs: the same generator draws the same tokens.
    for kw in ({}, dict(top_k=10, top_p=0.9, temperature=0.8)):
        eager = ours.generate(idx, 100, seed=5, cuda_graphs=False, **kw)
        assert torch.equal(ours.generate(idx, 100, seed=5, cuda_graphs=True, **kw), eager)
        torch.manual_seed(5)  # and the default generator, which the graph owns
        eager = ours.generate(idx, 100, cuda_graphs=False, **kw)
        torch.manual_seed(5)
        assert torch.equal(ours.generate(idx, 100, cuda_graphs=True, **kw), eager)


@pytest.mark.gpu
def test_captured_generation_never_syncs(device):
    """Once both regimes' steps are captured, a token costs one replay and no host sync."""
    _, ours = pair(32)
    ours = ours.float().to(device)
    tokens = ours.stream(torch.randint(65, (1, 3), device=device), 200, seed=1)
    for _ in range(32 + 10):  # past both captures (the window's comes a few steps after 32)
        next(tokens)
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == 200 - 42


@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_k=66), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "non-empty"),
    (dict(idx=torch.full((1, 2), 99)), "token ids outside"),
])
def test_bad_arguments(kw, words):
    _, ours = pair(8)
    args = dict(idx=torch.zeros(1, 1, dtype=torch.long), max_new_tokens=5)
    args.update(kw)
    with pytest.raises(ValueError, match=words):
        ours.generate(**args)
    with pytest.raises(ValueError, match="empty"):
        ours.generate([], 3)


def test_a_long_stream_shifts_its_window_in_place_and_stays_exact():
    """Past block_size the stream keeps one (B, block_size) window that shifts left a token a
    step (so --max-new-tokens 10**12 needs no more memory than 100)."""
    lecture, ours = pair(8, n_layer=1)
    idx = torch.randint(65, (1, 3))
    n = 75
    expect = idx
    with torch.no_grad():
        for _ in range(n):
            logits, _ = lecture(expect[:, -8:])
            expect = torch.cat([expect, logits.view(1, -1, 65)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate(idx, n, temperature=0), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_is_torch_multinomial_token_for_token(dtype):
    """draw() spells out how torch.multinomial(probs, 1) samples, so the same generator state
    gives the same tokens, zeros (top-k, top-p) included."""
    torch.manual_seed(0)
    probs = F.softmax(torch.randn(4, 65, dtype=dtype) * 3, dim=-1)
    probs[1, :60] = 0.0
    for seed in range(20):
        expect = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(draw(probs, torch.Generator().manual_seed(seed)), expect)


def test_flat_blocks_compute_what_the_modules_do():
    _, ours = pair(16)
    net = net_of(ours)
    assert net.flat
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    idx, pos = torch.randint(65, (2, 16)), torch.arange(16)
    with torch.no_grad():
        assert torch.equal(net.embed(idx, pos), ours.embed(idx, pos))
        assert torch.equal(net.to_logits(x), ours.to_logits(x))
        for block, fast in zip(ours.blocks, net.blocks):
            assert torch.equal(fast(x), block(x))
            # the last position alone: the same up to the attention kernel's summation order
            torch.testing.assert_close(fast(x, last=True), block(x)[:, -1:], rtol=1e-13, atol=1e-13)
            x = block(x)


def test_flat_is_used_only_where_it_is_exact():
    """A model in training mode (dropout), a patched module or a hook keeps the modules."""
    _, ours = pair(8)
    assert net_of(ours).flat
    assert not net_of(ours.train()).flat
    ours.eval()
    handle = ours.blocks[0].ffwd.register_forward_hook(lambda m, i, o: o * 2)
    assert not net_of(ours).flat
    idx = torch.randint(65, (1, 3))
    with torch.no_grad():  # and generation goes through the hook
        assert torch.equal(ours.generate(idx, 12, temperature=0),
                           oracle_generate(ours, idx, 12, None, temperature=0))
    handle.remove()
    ours.blocks[1].sa.forward = lambda x, attend=None: torch.zeros_like(x)
    assert not net_of(ours).flat


def test_compiled_steps_generate_the_same_tokens():
    """compile=True (torch.compile of each regime's step, fixed shapes) samples exactly what
    the eager steps sample, through the cache and past block_size."""
    _, ours = pair(8, n_layer=1)
    ours = ours.float()
    idx = torch.randint(65, (2, 3))
    eager = ours.generate(idx, 14, seed=3, top_k=20)
    torch.testing.assert_close(ours.generate(idx, 14, seed=3, top_k=20, compile=True), eager,
                               rtol=0, atol=0)


def test_cuda_graphs_need_cuda():
    _, ours = pair(8)
    with pytest.raises(ValueError, match="cuda_graphs"):
        ours.generate(torch.zeros(1, 1, dtype=torch.long), 3, cuda_graphs=True)
