"""Decoder-only Transformer models (plain ``nn.Module`` code)."""

from megalm.model.flops import flops_per_token, param_count
from megalm.model.generate import generate
from megalm.model.gpt import GPT, ties_embeddings, validate_model_config

__all__ = [
    "GPT",
    "flops_per_token",
    "generate",
    "param_count",
    "ties_embeddings",
    "validate_model_config",
]
