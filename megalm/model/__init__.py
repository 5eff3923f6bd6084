"""Language models (plain ``nn.Module`` code): the Transformer families and the LSTM baseline."""

from __future__ import annotations

from torch import nn

from megalm.config import ModelConfig
from megalm.model.generate import Sampling, decoding, generate
from megalm.model.gpt import GPT
from megalm.model.kv_cache import KVCache


def build_model(
    cfg: ModelConfig,
    tp_group=None,
    sequence_parallel: bool = False,
    init_seed: int | None = None,
    cp_group=None,
) -> nn.Module:
    """The model ``model.family`` names: :class:`GPT` (llama, gpt2) or
    :class:`megalm.model.lstm.LSTMLM` (lstm; no TP/SP/CP split, refused by the layout rules)."""
    if cfg.family == "lstm":
        from megalm.model.lstm import LSTMLM

        return LSTMLM(cfg, tp_group, init_seed)
    return GPT(cfg, tp_group, sequence_parallel, init_seed, cp_group)


__all__ = [
    "GPT",
    "KVCache",
    "Sampling",
    "build_model",
    "decoding",
    "generate",
]
