"""Causal scaled-dot-product attention with the heads as a batch dimension, and the lecture's
multi-head module on it.

    from lecture_flash import causal_attention, MultiHeadAttention
    out = causal_attention(q, k, v)          # q: (B, H, Tq, D), k, v: (B, H, Tk, D)
    sa = MultiHeadAttention(n_head, head_size, n_embd=n_embd, dropout=dropout)  # the lecture's module

Where things are: dispatch.py (causal_attention, decode_attention: checks and routes), sdpa.py
(scaled_dot_product_attention, SDPA's signature), flash.py and its flash_*.py siblings (the
Triton kernels), reference.py (the oracle), modules.py (MultiHeadAttention), hf.py (Hugging Face
transformers), settings.py (process defaults). The lecture's GPT is lecture_flash.gpt.
"""
from .dispatch import (auto_report, available_backends, causal_attention, decode_attention,
                       default_device)
from .modules import MultiHeadAttention
from .reference import causal_attention_reference
from .sdpa import scaled_dot_product_attention
from .settings import set_defaults

__all__ = ["causal_attention", "decode_attention", "scaled_dot_product_attention",
           "MultiHeadAttention", "available_backends", "auto_report", "causal_attention_reference",
           "default_device", "set_defaults"]
