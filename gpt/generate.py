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
graph) | window_logits (past block_size) -> sample. Each step samples its token and writes it
where the next step reads it, so on CUDA the whole step, sampling included, is one graph replay
and nothing is read back to the host until the caller reads a token. On any device, a model in
eval mode runs its blocks as FlatBlocks: the same arithmetic without nn.Module's per-call cost.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lecture_flash import causal_attention, decode_attention
from lecture_flash.modules import MultiHeadAttention, merge_heads, split_heads

from .step import Captured


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


class FlatBlock:
    """A Block in eval mode as plain tensor ops on its parameters: the arithmetic of Block.forward
    (tests/test_generate.py checks it bitwise) without nn.Module's per-call cost, about 8 us a
    module on a 2-core CPU and twelve modules a block, a third of a small model's step there.
    last=True: only the last position's output (B, 1, C), for the last block, whose other
    positions no logit needs (their keys and values are still computed, and cached)."""

    def __init__(self, block, attention):
        self.sa, self.attention = block.sa, attention  # the weights below are the parameters
        self.ln1, self.ln2 = _layer_norm(block.ln1), _layer_norm(block.ln2)
        self.qkv, self.proj = (block.sa.qkv.weight,), _linear(block.sa.proj)
        self.fc, self.out = _linear(block.ffwd.net[0]), _linear(block.ffwd.net[2])

    def __call__(self, x, attend=None, last=False):
        q, k, v = split_heads(F.linear(F.layer_norm(x, *self.ln1), *self.qkv), self.sa.num_heads)
        if last:  # the last query sees every key, as it does in the full causal mask
            q, x = q[:, :, -1:], x[:, -1:]
        out = (attend or self.attention)(q, k, v)
        x = x + F.linear(merge_heads(out), *self.proj)
        return x + F.linear(F.relu(F.linear(F.layer_norm(x, *self.ln2), *self.fc)), *self.out)


def step_attention(sa, weight):
    """fn(q, k, v) -> causal attention of module sa's heads as the steps call it: causal with
    Tq == Tk, or queries that see every key. On a CPU, where causal_attention would run
    PyTorch's SDPA (backend "auto" or "sdpa", float32 or float64, a positive scale), SDPA itself:
    causal_attention's per-call work there (the backend's choice, and the check that keeps
    non-finite keys a query must not see out of its output, kernels/masking.py) is a quarter of
    a small model's step, and cannot change a sampled token: the last position sees every
    position of every layer, so such a key makes the logits non-finite either way."""
    scale = sa.scale if sa.scale is not None else sa.head_size ** -0.5
    if (weight.device.type == "cpu" and sa.backend in ("auto", "sdpa") and scale > 0
            and weight.dtype in (torch.float32, torch.float64)):
        def attention(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
        return attention

    def attention(q, k, v):
        return causal_attention(q, k, v, scale=sa.scale, backend=sa.backend)
    return attention


class ModuleBlock:
    """A Block run through its modules (where FlatBlock would not be exact), called alike."""

    def __init__(self, block):
        self.block, self.sa = block, block.sa

    def __call__(self, x, attend=None, last=False):
        x = self.block(x, attend)
        return x[:, -1:] if last else x


def _layer_norm(m):
    return m.normalized_shape, m.weight, m.bias, m.eps


def _linear(m):
    return m.weight, m.bias


class Net:
    """The model as the steps run it: embed(idx, pos), blocks (each block(x, attend=None,
    last=False)), to_logits(x), config. flat: FlatBlocks and the embedding and head as plain
    ops, where that computes exactly what the modules would (see net_of); else the modules."""

    def __init__(self, model, flat):
        self.config, self.flat = model.config, flat
        weight = model.lm_head.weight
        self.attention = [step_attention(b.sa, weight) for b in model.blocks]  # per layer
        self.blocks = [FlatBlock(b, a) if flat else ModuleBlock(b)
                       for b, a in zip(model.blocks, self.attention)]
        self.embedding = model.token_embedding_table.weight, model.position_embedding_table.weight
        self.ln_f, self.lm_head = _layer_norm(model.ln_f), _linear(model.lm_head)
        if not flat:
            self.embed, self.to_logits = model.embed, model.to_logits

    def embed(self, idx, pos):
        tokens, positions = self.embedding
        return F.embedding(idx, tokens) + F.embedding(pos, positions)

    def to_logits(self, x):
        return F.linear(F.layer_norm(x, *self.ln_f), *self.lm_head)

    def run(self, x, attend_at=None):
        """The blocks on x (B, T, C), with attend_at(layer) -> attend (None: the layer's
        attention); the last position's output (B, C)."""
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            attend = None if attend_at is None else attend_at(layer)
            x = block(x, attend, last=layer == last)
        return x[:, -1]


# The module classes whose eval-mode arithmetic FlatBlock and Net reproduce exactly: PyTorch's
# and ours here, and the model's own, which gpt/model.py adds as it defines them (flat_exact).
FLAT_EXACT = {MultiHeadAttention, nn.Sequential, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout,
              nn.Embedding}


def flat_exact(cls):
    """Class decorator: net_of may run modules of exactly this class as plain tensor ops."""
    FLAT_EXACT.add(cls)
    return cls


def net_of(model):
    """The model as the steps run it (Net), flat where that computes exactly what the modules
    would: the model in eval mode (no dropout), every module of a FLAT_EXACT class (not a
    subclass), none patched or hooked (those may change what a module does)."""
    kinds = FLAT_EXACT
    hooked = any(getattr(nn.modules.module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks"))
    return Net(model, flat=not model.training and not hooked and all(
        type(m) in kinds and "forward" not in vars(m) and not m._forward_hooks
        and not m._forward_pre_hooks for m in model.modules()))


def prefill(net, idx, cache):
    """Run tokens idx (B, T) at positions [0, T), filling the cache; logits of the last (B, V)."""
    pos = cache.positions[:idx.shape[1]]

    def attend_at(layer):
        def attend(q, k, v):  # (B, H, T or 1, hs), (B, H, T, hs) ...
            cache.update(layer, pos, k, v)
            return net.attention[layer](q, k, v)
        return attend
    return net.to_logits(net.run(net.embed(idx, pos), attend_at))


def decode_one_token(net, tok, pos, cache):
    """One new token per row, tok (B, 1), at position pos (an int); logits (B, V). Attends to
    the cache's first pos + 1 entries (views, no copies) with the kernel's Tq = 1 < Tk path."""
    pos_t = cache.positions[pos:pos + 1]

    def attend_at(layer):
        def attend(q, k, v):  # (B, H, 1, hs) each
            k_all, v_all = cache.update(layer, pos_t, k, v)  # (B, H, block_size, hs)
            return net.attention[layer](q, k_all[:, :, :pos + 1], v_all[:, :, :pos + 1])
        return attend
    return net.to_logits(net.run(net.embed(tok, pos_t), attend_at))


def decode_one_token_static(net, tok, pos, cache):
    """decode_one_token with every shape fixed, for a CUDA graph: pos is a (1,) device tensor,
    never read on the host, and each step attends to the whole cache, of which the first
    pos + 1 entries are valid (lecture_flash.decode_attention)."""
    seqlens = (pos + 1).expand(tok.shape[0])  # (B,) valid keys per row

    def attend_at(layer):
        def attend(q, k, v):  # (B, H, 1, hs) each
            k_all, v_all = cache.update(layer, pos, k, v)
            return decode_attention(q, k_all, v_all, seqlens, scale=net.blocks[layer].sa.scale)
        return attend
    return net.to_logits(net.run(net.embed(tok, pos), attend_at))


def window_logits(net, window, positions):
    """Logits (B, V) of the last position of a full (B, block_size) window at positions
    (block_size,): the lecture's step."""
    return net.to_logits(net.run(net.embed(window, positions)))


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next tokens (B, 1) from logits (B, V).

    temperature 0 or top_k 1 is greedy (argmax). Otherwise softmax(logits / temperature),
    restricted to the top_k tokens and/or the smallest set whose mass reaches top_p, sampled
    as torch.multinomial samples one token (with generator if given). With the defaults this is
    the lecture's softmax + multinomial, token for token.
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
    return draw(probs, generator)


def draw(probs, generator=None):
    """One token per row of probs (B, V), as torch.multinomial(probs, 1) draws it: PyTorch takes
    the argmax of probs over Exp(1) noise (the Gumbel-max trick), so the same generator state
    gives the same token (tests/test_generate.py checks it). Written out, it is only ops a CUDA
    graph can hold: no check of the probabilities on the host."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def check_sampling_args(vocab_size, max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def stream_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                  generator=None, cuda_graphs=None, compile=False):
    """Yield each new (B, 1) token of `model` continuing idx (B, T), as the lecture samples.

    cuda_graphs: capture the per-token steps, sampling included, in CUDA graphs (default: on
    when idx is on CUDA). Nothing is read back to the host: the yielded tokens are device
    tensors, and reading one is the caller's choice.
    compile: torch.compile the model's part of each step (fewer, fused kernels per token; the
    first step of each regime compiles, which takes seconds). Both steps then have fixed shapes.
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
    if graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs idx on a CUDA device, got {device}")
    net = net_of(model)

    def next_token(logits):
        return sample(logits, temperature, top_k, top_p, generator)

    def compiled(fn):
        return torch.compile(fn, dynamic=False) if compile else fn

    made = 0
    if T0 <= bs:
        # In cache: every token so far in `context` (room for block_size + 1); the step at
        # position p reads the token there and writes the next one at p + 1, while p has a slot.
        cache = KVCache(model, B, device, model.lm_head.weight.dtype)
        context = torch.empty(B, bs + 1, dtype=torch.long, device=device)
        context[:, :T0] = idx
        context[:, T0:T0 + 1] = next_token(prefill(net, idx, cache))
        made = 1
        yield context[:, T0:T0 + 1]
        pos = cache.positions[T0:T0 + 1].clone()  # the graphed step's position, on the device

        decode = compiled(lambda tok, at: decode_one_token_static(net, tok, at, cache))

        def cache_step():
            nxt = next_token(decode(context.index_select(1, pos), pos))
            pos.add_(1)
            context.index_copy_(1, pos, nxt)

        # Graphed or compiled, every step has the same shapes; eager, p slices the cache.
        step = Captured(cache_step, [generator]) if graphs else cache_step if compile else None
        for p in range(T0, min(bs, T0 + max_new_tokens - 1)):
            if step is not None:
                step()
            else:
                context[:, p + 1:p + 2] = next_token(decode_one_token(net, context[:, p:p + 1], p, cache))
            made += 1
            yield context[:, p + 1:p + 2]  # never written again
        del cache, step
    if made == max_new_tokens:
        return
    # Past block_size: the window holds the last block_size tokens; each step samples from it
    # and shifts it left by one, appending the new token.
    window = (idx if made == 0 else context[:, :T0 + made])[:, -bs:].clone()
    positions = torch.arange(bs, device=device)

    forward = compiled(lambda w: window_logits(net, w, positions))

    def window_step():
        nxt = next_token(forward(window))
        window.copy_(torch.cat([window[:, 1:], nxt], dim=1))
        return nxt

    step = Captured(window_step, [generator]) if graphs else window_step
    for _ in range(max_new_tokens - made):
        yield step().clone()  # (a replay overwrites its output)


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
