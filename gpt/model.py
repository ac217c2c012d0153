"""The lecture's GPT with its per-head attention replaced by one batched module.

Module names follow the lecture (token_embedding_table, blocks.i.sa, blocks.i.ffwd.net, ...), so a
state dict saved by the lecture's gpt.py loads with load_state_dict and gives the same logits.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lecture_flash import MultiHeadAttention

from .generate import flat_exact, generate_batch, stream_tokens


@dataclass
class GPTConfig:
    vocab_size: int = 65     # distinct characters of Tiny Shakespeare
    block_size: int = 256    # longest context the model sees (learned positions)
    n_embd: int = 384        # width of the residual stream
    n_head: int = 6          # attention heads per block; head size = n_embd // n_head
    n_layer: int = 6         # transformer blocks
    dropout: float = 0.2     # on attention weights, after each projection, in the MLP
    backend: str = "auto"    # attention backend, see lecture_flash.causal_attention
    attn_scale: float = None  # None: head_size ** -0.5 (the lecture's final gpt.py)

    @classmethod
    def from_preset(cls, name, **overrides):
        """The model of a named preset (PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name]["model"], **overrides})

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# Named configurations, as gpt-fast's transformer_configs: a model shape (GPTConfig fields) and
# the training run the lecture gave it (gpt.train's hyperparameters). gpt.train, gpt.sample and
# bench/ all take their configs from here.
PRESETS = {
    # The lecture's final gpt.py: GPTConfig's defaults.
    "lecture": dict(model=dict(),
                    train=dict(batch_size=64, lr=3e-4, max_iters=5000, eval_interval=500,
                               eval_iters=200)),
    # The lecture's first transformer config (its "small" run).
    "small": dict(model=dict(block_size=32, n_embd=64, n_head=4, n_layer=4, dropout=0.0),
                  train=dict(batch_size=16, lr=1e-3, max_iters=5000, eval_interval=100,
                             eval_iters=200)),
    # A CPU check that trains in seconds.
    "tiny": dict(model=dict(block_size=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0),
                 train=dict(batch_size=16, lr=3e-3, max_iters=300, eval_interval=100,
                            eval_iters=20)),
    # The speedrun: the lecture's model (its checkpoints load into the lecture's code) trained on
    # nanoGPT's shakespeare_char recipe, which reaches a validation loss of 1.4697 with this
    # shape: lr 1e-3 warmed up over 100 steps and cosine-decayed to 1e-4 by step 5000, AdamW
    # beta2 0.99 and weight decay 0.1, dropout 0.2. The run stops as soon as an evaluation
    # (every 250 steps, 200 batches of the val split) reaches 1.47, and says how long it took.
    # On CUDA it runs in bfloat16 under torch.compile unless --dtype / --no-compile say otherwise.
    "speedrun": dict(model=dict(), train=dict(batch_size=64, lr=1e-3, max_iters=5000,
                                              eval_interval=250, eval_iters=200, warmup_iters=100,
                                              min_lr=1e-4, beta2=0.99, weight_decay=0.1,
                                              target_loss=1.47),
                     run=dict(dtype="bfloat16", compile=True)),
}
# What a preset's training run leaves out: no warm-up, a constant lr (min_lr None), AdamW's
# defaults, no target loss (train for max_iters).
TRAIN_DEFAULTS = dict(warmup_iters=0, min_lr=None, beta2=0.999, weight_decay=0.01, target_loss=None)


@flat_exact
class FeedForward(nn.Module):
    """The lecture's MLP: expand by 4, ReLU, project back, dropout."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


@flat_exact
class Block(nn.Module):
    """Communication (attention) followed by computation (MLP), pre-norm residual."""

    def __init__(self, cfg):
        super().__init__()
        self.sa = MultiHeadAttention(cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd, cfg.dropout,
                                     cfg.backend, cfg.attn_scale)
        self.ffwd = FeedForward(cfg.n_embd, cfg.dropout)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)

    def forward(self, x, attend=None):
        x = x + self.sa(self.ln1(x), attend)  # (B, T, C)
        return x + self.ffwd(self.ln2(x))     # (B, T, C)


@flat_exact
class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)
        # Context parallelism (gpt/context.py, train.py --context-parallel): while set, forward
        # computes this rank's shard of every sequence.
        self.context = None

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids, T <= block_size -> logits (B, T, vocab), loss or None."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"idx has {T} positions but block_size is {self.config.block_size}; "
                             "crop the context (generate does this)")
        if self.context is not None:
            return self.context.forward(self, idx, targets)
        logits = self.to_logits(self.hidden(idx))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def hidden(self, idx):
        """Token ids (B, T) at positions [0, T) -> the last block's output (B, T, C)."""
        x = self.embed(idx, torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        return self.blocks(x)                                                # (B, T, C)

    def embed(self, idx, pos):
        """Token ids (B, T) at positions pos (T,) -> (B, T, C)."""
        return self.token_embedding_table(idx) + self.position_embedding_table(pos)

    def to_logits(self, x):
        """Final layer norm and vocabulary projection: (..., C) -> (..., vocab)."""
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, seed=None, stop=None, cuda_graphs=None, compile=False):
        """Continue idx (B, T) by max_new_tokens tokens sampled as the lecture samples them.

        Exact: every token is drawn from softmax(logits) of the model run on the last
        block_size tokens, as the lecture's generate does, only faster. While the sequence
        fits in block_size a KV cache holds earlier positions, so each token costs one
        position; past block_size the lecture's crop shifts all positions every step, so each
        token costs one forward over a static (B, block_size) window (captured in a CUDA graph
        on CUDA). See gpt/generate.py.

        temperature: divides the logits; 0 means greedy (argmax). top_k: keep the k likeliest
        tokens. top_p: keep the smallest set of tokens whose probability reaches top_p.
        generator / seed: a torch.Generator (on idx's device) or a seed for a new one.
        stop: a token-id sequence; generation ends once every row has produced it (this reads
        the tokens back to the host after each step).
        cuda_graphs: capture the per-token steps, sampling included, in CUDA graphs (default:
        on for CUDA): a token is then one graph replay, with no host sync.
        compile: torch.compile the steps' model part (fused kernels; seconds to compile; on
        a GPU, not a CPU, where the small models it was measured on ran no faster).
        idx may also be a list of 1-D prompts of different lengths: a list comes back.
        """
        if isinstance(idx, (list, tuple)):
            return generate_batch(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                  top_p=top_p, generator=self._generator(idx, generator, seed),
                                  cuda_graphs=cuda_graphs, compile=compile)
        new = []
        stop = torch.as_tensor(stop, device=idx.device) if stop else None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for tok in self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator, seed,
                               cuda_graphs, compile):
            new.append(tok)
            if stop is not None and len(new) >= len(stop):
                # only the newest len(stop) tokens can complete the stop sequence
                done |= (torch.cat(new[-len(stop):], dim=1) == stop).all(dim=1)
                if bool(done.all()):
                    break
        return torch.cat([idx] + new, dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               generator=None, seed=None, cuda_graphs=None, compile=False):
        """Yield each new (B, 1) token as it is sampled; arguments as generate."""
        if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] > 0:
            if int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size:
                raise ValueError(f"idx holds token ids outside [0, {self.config.vocab_size})")
        yield from stream_tokens(self, idx, max_new_tokens, temperature, top_k, top_p,
                                 self._generator(idx, generator, seed), cuda_graphs, compile)

    def _generator(self, idx, generator, seed):
        if seed is None:
            return generator
        if generator is not None:
            raise ValueError("pass generator or seed, not both")
        return torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
