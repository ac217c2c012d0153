"""The lecture's GPT on a batched, fused causal attention.

    from lecture_flash.gpt import GPT, GPTConfig

Names are imported at first use (lecture_flash/lazy.py), as lecture_flash's are.
"""
from typing import TYPE_CHECKING

from lecture_flash.lazy import offer

_OFFERS = {name: "model" for name in ("GPT", "GPTConfig", "Block", "FeedForward",
                                      "MultiHeadAttention")}
__all__ = list(_OFFERS)
__getattr__, __dir__ = offer(__name__, _OFFERS)

if TYPE_CHECKING:  # what editors and type checkers see
    from .model import GPT, Block, FeedForward, GPTConfig, MultiHeadAttention  # noqa: F401
