"""Decoder-only Transformer language model (Llama-style or GPT-2-style by config)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.model.layers import Block, make_norm


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming the keys when the shape cannot be built."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be > 0 (it is filled in from the tokenizer)")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.d_model ({cfg.d_model}) must be divisible by model.n_heads ({cfg.n_heads})")
    kv = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % kv:
        raise ValueError(f"model.n_heads ({cfg.n_heads}) must be divisible by model.n_kv_heads ({kv})")
    if cfg.family == "llama" and (cfg.d_model // cfg.n_heads) % 2:
        raise ValueError("RoPE needs an even head size: d_model / n_heads must be even")


def ties_embeddings(cfg: ModelConfig) -> bool:
    """Whether the output head shares the token embedding (gpt2 default) or not (llama)."""
    return cfg.family == "gpt2" if cfg.tie_embeddings is None else cfg.tie_embeddings


class GPT(nn.Module):
    """Token embedding -> ``n_layers`` pre-norm blocks -> final norm -> vocabulary head.

    ``forward(tokens, labels)`` returns the mean next-token cross entropy;
    ``forward(tokens)`` returns logits (B, T, V).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if ties_embeddings(cfg):
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std) for weights; residual output projections get
        ``init_std / sqrt(2 n_layers)`` (GPT-2, Radford et al. 2019, section 2.3;
        Megatron-LM ``scaled_init_method_normal``). Biases zero, norm gains one."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_proj", False):
                std = std / math.sqrt(2 * self.cfg.n_layers)
            if module is not self.head or not ties_embeddings(self.cfg):
                nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, labels: (B, T) int64. Returns logits (B, T, V) or a scalar loss."""
        B, T = tokens.shape
        if self.cfg.seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len={self.cfg.seq_len}")
        x = self.tok_emb(tokens)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(B * T, -1), labels.reshape(B * T))
