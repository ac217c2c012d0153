"""Fast generation with exactly the lecture's distribution.

The lecture samples each token from the model run on the last block_size tokens, with learned
absolute positions. Two regimes follow from that:

- In cache (the sequence still fits in block_size): the context starts at position 0, so the
  keys and values of earlier tokens never change. We prefill the prompt once and then run the
  model on one new position per token against a KV cache (Tq = 1 < Tk).
- Past block_size: the lecture crops the context to the last block_size tokens, which shifts
  every token's position by one at each step, so every cached key is stale. Reusing them (a
  "sliding cache") would sample from a different distribution, so we do not: each token costs
  one forward over a static (B, block_size) window. On CUDA that forward is captured once in a
  CUDA graph and replayed, with no allocation or launch overhead per step.

Steps, as in gpt-fast: prefill -> decode_one_token (in cache; decode_one_token_static in a CUDA
graph) | window_logits (past block_size) -> sample.
"""
import torch
import torch.nn.functional as F

from kernels import causal_attention, decode_attention


class KVCache:
    """Keys and values of every layer for positions [0, block_size): (B, H, block_size, hs) each.

    update() is the one place a step writes into it.
    """

    def __init__(self, model, batch, device, dtype):
        cfg = model.config
        shape = (batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.positions = torch.arange(cfg.block_size, device=device)  # slot indices, never copied

    def update(self, layer, pos, k, v):
        """Write k, v (B, H, T, hs) at positions pos (T,), a device tensor (so a CUDA graph can
        capture the write); return the layer's whole (k, v) cache."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


def prefill(model, idx, cache):
    """Run tokens idx (B, T) at positions [0, T), filling the cache; logits of the last (B, V)."""
    T = idx.shape[1]
    pos = cache.positions[:T]
    x = model.embed(idx, pos)  # (B, T, C)
    for layer, block in enumerate(model.blocks):
        def attend(q, k, v, layer=layer, sa=block.sa):  # (B, H, T, hs) each
            cache.update(layer, pos, k, v)
            return causal_attention(q, k, v, scale=sa.scale, backend=sa.backend)
        x = block(x, attend)
    return model.to_logits(x[:, -1])  # (B, V)


def decode_one_token(model, tok, pos, cache):
    """One new token per row, tok (B, 1), at position pos (an int); logits (B, V). Attends to
    the cache's first pos + 1 entries (views, no copies) with the kernel's Tq = 1 < Tk path."""
    pos_t = cache.positions[pos:pos + 1]
    x = model.embed(tok, pos_t)  # (B, 1, C)
    for layer, block in enumerate(model.blocks):
        def attend(q, k, v, layer=layer, sa=block.sa):  # q, k, v: (B, H, 1, hs)
            k_all, v_all = cache.update(layer, pos_t, k, v)  # (B, H, block_size, hs)
            return causal_attention(q, k_all[:, :, :pos + 1], v_all[:, :, :pos + 1],
                                    scale=sa.scale, backend=sa.backend)
        x = block(x, attend)
    return model.to_logits(x[:, -1])


def decode_one_token_static(model, tok, pos, cache):
    """decode_one_token with every shape fixed, for a CUDA graph: pos is a (1,) device tensor,
    never read on the host, and each step attends to the whole cache, of which the first
    pos + 1 entries are valid (kernels.decode_attention)."""
    x = model.embed(tok, pos)  # (B, 1, C)
    seqlens = (pos + 1).expand(tok.shape[0])  # (B,) valid keys per row
    for layer, block in enumerate(model.blocks):
        def attend(q, k, v, layer=layer, sa=block.sa):  # q, k, v: (B, H, 1, hs)
            k_all, v_all = cache.update(layer, pos, k, v)
            return decode_attention(q, k_all, v_all, seqlens, scale=sa.scale)
        x = block(x, attend)
    return model.to_logits(x[:, -1])


def window_logits(model, window):
    """Logits (B, V) of the last position of a full (B, block_size) window: the lecture's step."""
    return model.to_logits(model.hidden(window)[:, -1])  # only the last position's logits are needed


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next tokens (B, 1) from logits (B, V).

    temperature 0 or top_k 1 is greedy (argmax). Otherwise softmax(logits / temperature),
    restricted to the top_k tokens and/or the smallest set whose mass reaches top_p, sampled
    with torch.multinomial (with generator if given). With the defaults this is the lecture's
    softmax + multinomial.
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature if temperature != 1.0 else logits
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _Graphed:
    """A function of fixed-shape device tensors captured once in a CUDA graph and replayed.

    Each replay reruns the same kernels on the same buffers: inputs are copied into static
    tensors first, and the output tensor is overwritten in place (read it before the next call).
    """

    def __init__(self, fn, *example):
        self.static_in = [t.clone() for t in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy inits, autotuning)
            for _ in range(2):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_in)

    def __call__(self, *args):
        for dst, src in zip(self.static_in, args):
            dst.copy_(src)
        self.graph.replay()
        return self.static_out


def check_sampling_args(vocab_size, max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


STREAM_BUFFER = 4096  # new tokens a stream keeps before it moves the last block_size to the front


@torch.inference_mode()
def stream_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                  generator=None, cuda_graphs=None):
    """Yield each new (B, 1) token of `model` continuing idx (B, T), as the lecture samples.

    cuda_graphs: capture the per-token steps in CUDA graphs (default: on when idx is on CUDA).
    """
    cfg = model.config
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (B, T) tensor of token ids, got "
                         f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    check_sampling_args(cfg.vocab_size, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    B, T0 = idx.shape
    bs, device = cfg.block_size, idx.device
    graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    dtype = model.lm_head.weight.dtype
    # The prompt and the newest tokens in one preallocated buffer: no torch.cat per step. When it
    # is full, its last block_size tokens (all the window needs) move to its front, so a long
    # stream needs no more memory than a short one.
    capacity = T0 + min(max_new_tokens, max(STREAM_BUFFER, 2 * bs))
    tokens = torch.empty(B, capacity, dtype=torch.long, device=device)
    tokens[:, :T0] = idx
    length, made = T0, 0

    def emit(logits):
        nonlocal length, made
        nxt = sample(logits, temperature, top_k, top_p, generator)
        if length == capacity:
            tokens[:, :bs] = tokens[:, length - bs:length].clone()
            length = bs
        tokens[:, length:length + 1] = nxt
        length += 1
        made += 1
        return nxt

    if T0 <= bs:
        cache = KVCache(model, B, device, dtype)
        yield emit(prefill(model, idx, cache))
        step = None
        # Position length - 1 holds the newest token; it still has a slot while length <= bs.
        while made < max_new_tokens and length <= bs:
            pos = length - 1
            tok = tokens[:, pos:pos + 1]
            if graphs:
                if step is None:  # graph inputs are views of tokens and cache.positions
                    step = _Graphed(lambda t, p: decode_one_token_static(model, t, p, cache),
                                    tok, cache.positions[pos:pos + 1])
                logits = step(tok, cache.positions[pos:pos + 1])
            else:
                logits = decode_one_token(model, tok, pos, cache)
            yield emit(logits)
        del cache, step
    window = None
    while made < max_new_tokens:
        ctx = tokens[:, length - bs:length]  # here length > bs, or the prompt was longer
        if graphs:
            if window is None:
                window = _Graphed(lambda w: window_logits(model, w), ctx)
            logits = window(ctx)
        else:
            logits = window_logits(model, ctx)
        yield emit(logits)


def generate_batch(model, prompts, max_new_tokens, **kwargs):
    """Prompts of different lengths: a list of 1-D token tensors (or lists) -> list of tensors.

    Each prompt's positions start at 0, as in the lecture, so prompts of equal length are
    batched together and each length runs on its own.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    device = model.lm_head.weight.device
    seqs = [torch.as_tensor(p, dtype=torch.long, device=device).view(-1) for p in prompts]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    out = [None] * len(seqs)
    for n in sorted({len(s) for s in seqs}):
        rows = [i for i, s in enumerate(seqs) if len(s) == n]
        idx = torch.stack([seqs[i] for i in rows])
        new = list(stream_tokens(model, idx, max_new_tokens, **kwargs))
        full = torch.cat([idx] + new, dim=1) if new else idx
        for j, i in enumerate(rows):
            out[i] = full[j]
    return out
