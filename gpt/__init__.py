"""The lecture's GPT on a batched, fused causal attention."""
from .model import GPT, Block, FeedForward, GPTConfig, MultiHeadAttention

__all__ = ["GPT", "GPTConfig", "Block", "FeedForward", "MultiHeadAttention"]
