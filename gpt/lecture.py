"""The lecture's GPT, written afresh: one `Head` module per attention head, joined with torch.cat.

This is the baseline the tests and benchmarks compare against, and a reference for readers. It
follows the final gpt.py of "Let's build GPT" line for line in spirit, with the globals
(n_embd, block_size, dropout, ...) turned into constructor arguments. Only tests/ and bench/
import it: the model itself (gpt/model.py) does not depend on it.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F


def head_attention(q, k, v, tril, scale, dropout=None):
    """The body of the lecture's Head.forward on projected q, k, v of shape (B, T, hs)."""
    T = q.shape[1]
    wei = q @ k.transpose(-2, -1) * scale  # (B, T, T)
    wei = wei.masked_fill(tril[:T, :T] == 0, float("-inf"))
    wei = F.softmax(wei, dim=-1)
    if dropout is not None:
        wei = dropout(wei)
    return wei @ v  # (B, T, hs)


def per_head_attention(q, k, v, scale=None):
    """The lecture's attention on (B, H, T, hs) inputs: one head at a time, then torch.cat."""
    T, hs = q.shape[-2], q.shape[-1]
    scale = hs**-0.5 if scale is None else scale
    tril = torch.tril(torch.ones(T, T, device=q.device))
    return torch.stack([head_attention(q[:, h], k[:, h], v[:, h], tril, scale)
                        for h in range(q.shape[1])], dim=1)


class Head(nn.Module):
    """One head of self-attention."""

    def __init__(self, n_embd, head_size, block_size, dropout, scale_by="head_size"):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)
        self.scale_by = scale_by  # the earliest lecture notes scale by C = n_embd

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)    # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        d = k.shape[-1] if self.scale_by == "head_size" else C
        return head_attention(q, k, v, self.tril, d**-0.5, self.dropout)


class MultiHeadAttention(nn.Module):
    """Several heads in parallel, concatenated, then projected."""

    def __init__(self, n_embd, num_heads, head_size, block_size, dropout, scale_by="head_size"):
        super().__init__()
        self.heads = nn.ModuleList(
            [Head(n_embd, head_size, block_size, dropout, scale_by) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


class FeedFoward(nn.Module):  # the lecture's spelling
    def __init__(self, n_embd, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Communication (attention) followed by computation (MLP), pre-norm residual."""

    def __init__(self, n_embd, n_head, block_size, dropout, scale_by="head_size"):
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_embd, n_head, head_size, block_size, dropout, scale_by)
        self.ffwd = FeedFoward(n_embd, dropout)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class GPTLanguageModel(nn.Module):
    def __init__(self, vocab_size, block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.2,
                 scale_by="head_size"):
        super().__init__()
        self.block_size = block_size
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(
            *[Block(n_embd, n_head, block_size, dropout, scale_by) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = self.blocks(tok_emb + pos_emb)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        B, T, C = logits.shape
        logits = logits.view(B * T, C)
        loss = F.cross_entropy(logits, targets.view(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, generator=None):
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.block_size:]  # crop to the last block_size tokens
            logits, _ = self(idx_cond)
            probs = F.softmax(logits[:, -1, :], dim=-1)  # (B, C)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
