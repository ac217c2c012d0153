"""Causal scaled-dot-product attention with the heads as a batch dimension, and the lecture's
multi-head module on it.

    from lecture_flash import causal_attention, MultiHeadAttention
    out = causal_attention(q, k, v)          # q: (B, H, Tq, D), k, v: (B, H, Tk, D)
    sa = MultiHeadAttention(n_head, head_size, n_embd=n_embd, dropout=dropout)  # the lecture's module

Where things are: dispatch.py (causal_attention, decode_attention: checks and routes), sdpa.py
(scaled_dot_product_attention, SDPA's signature), flash_attn_interface.py (flash-attn's
functions: `from lecture_flash import flash_attn_interface as flash_attn`), context_parallel.py
(one sequence over several ranks: ring_attention), flash.py and its flash_*.py siblings (the
Triton kernels), reference.py (the oracle), modules.py (MultiHeadAttention), hf.py (Hugging Face
transformers), settings.py (process defaults). The lecture's GPT is lecture_flash.gpt.

Each name is imported from its module at first use (lazy.py), so `import lecture_flash` loads
neither torch nor Triton until something is used: a command line's Ctrl-C while torch loads
then ends with one line (gpt/cli.py).
"""
from typing import TYPE_CHECKING

from .lazy import offer

# What the package offers: name -> the module that defines it.
_OFFERS = {
    "causal_attention": "dispatch", "decode_attention": "dispatch",
    "available_backends": "dispatch", "auto_report": "dispatch", "default_device": "dispatch",
    "scaled_dot_product_attention": "sdpa",
    "MultiHeadAttention": "modules",
    "causal_attention_reference": "reference",
    "set_defaults": "settings",
}
__all__ = list(_OFFERS)
__getattr__, __dir__ = offer(__name__, _OFFERS)

if TYPE_CHECKING:  # what editors and type checkers see
    from .dispatch import (auto_report, available_backends, causal_attention,  # noqa: F401
                           decode_attention, default_device)
    from .modules import MultiHeadAttention  # noqa: F401
    from .reference import causal_attention_reference  # noqa: F401
    from .sdpa import scaled_dot_product_attention  # noqa: F401
    from .settings import set_defaults  # noqa: F401
