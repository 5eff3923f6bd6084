"""Decoder-only Transformer models (plain ``nn.Module`` code)."""

from megalm.model.generate import generate
from megalm.model.gpt import GPT

__all__ = [
    "GPT",
    "generate",
]
