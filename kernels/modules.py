"""MultiHeadAttention: the lecture's multi-head attention as one module, all heads at once.

A drop-in for the lecture's Head + MultiHeadAttention classes (same constructor arguments, same
order; its per-head weights load unchanged), running causal_attention on all heads together.
gpt/ builds its model from it; it lives here so that a lecture script named gpt.py can import it
without importing this project's gpt package.
"""
import re

import torch
import torch.nn as nn

from .dispatch import causal_attention


def split_heads(qkv, num_heads):
    """The fused projection's output (B, T, 3 * H * hs) -> q, k, v (B, H, T, hs) each, strided
    views of it (no copies)."""
    B, T, _ = qkv.shape
    return qkv.view(B, T, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(out):
    """(B, H, T, hs) -> (B, T, H * hs): the heads side by side, as the lecture concatenates them."""
    B, H, T, hs = out.shape
    return out.transpose(1, 2).reshape(B, T, H * hs)


class MultiHeadAttention(nn.Module):
    """All heads of causal self-attention at once: one fused qkv projection, heads as a batch dim.

    Takes the lecture's arguments in the lecture's order and loads the lecture's per-head
    weights (heads.{i}.key/query/value.weight, heads.{i}.tril) as well as its own layout.
    `scale` defaults to head_size ** -0.5; the earliest lecture notes use n_embd ** -0.5.
    """

    def __init__(self, num_heads, head_size, n_embd=None, dropout=0.0, backend="auto", scale=None):
        super().__init__()
        self.num_heads, self.head_size = num_heads, head_size
        self.n_embd = n_embd if n_embd is not None else num_heads * head_size
        self.qkv = nn.Linear(self.n_embd, 3 * num_heads * head_size, bias=False)  # [q; k; v]
        self.proj = nn.Linear(num_heads * head_size, self.n_embd)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.backend = backend
        self.scale = scale

    def forward(self, x, attend=None):
        """x (B, T, C) -> (B, T, C). attend(q, k, v) replaces the attention (KV caches use it)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)      # (B, H, T, hs) each
        if attend is None:
            out = causal_attention(q, k, v, scale=self.scale,
                                   dropout_p=self.attn_dropout if self.training else 0.0,
                                   backend=self.backend)        # (B, H, T, hs)
        else:
            out = attend(q, k, v)
        return self.resid_dropout(self.proj(merge_heads(out)))  # (B, T, C)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The lecture stores one key/query/value Linear per head; stack them into our qkv.
        heads = {}
        for key in [k for k in state_dict if k.startswith(prefix + "heads.")]:
            m = re.fullmatch(re.escape(prefix) + r"heads\.(\d+)\.(key|query|value|tril)(\.weight)?", key)
            if m is None:
                continue  # left in place: load_state_dict reports it as unexpected
            tensor = state_dict.pop(key)
            if m.group(2) != "tril":  # the causal mask buffer is implied by the kernel
                heads[(int(m.group(1)), m.group(2))] = tensor
        if heads:
            n = self.num_heads
            if sorted({i for i, _ in heads}) != list(range(n)) or len(heads) != 3 * n:
                raise ValueError(f"{prefix}heads.*: expected key/query/value weights for heads "
                                 f"0..{n - 1}, got {sorted(heads)}")
            state_dict[prefix + "qkv.weight"] = torch.cat(
                [heads[(i, part)] for part in ("query", "key", "value") for i in range(n)], dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
