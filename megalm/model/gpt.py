"""Decoder-only Transformer language model (Llama-style or GPT-2-style by config)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.model.layers import Block, LayerNorm, make_norm
from megalm.parallel.dropout import dropout
from megalm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_tp,
    gather_logits,
    vocab_parallel_cross_entropy,
)
from megalm.parallel.mappings import copy_to_tp, tp_rank, tp_size


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


def padded_vocab_size(cfg: ModelConfig, tp: int = 1) -> int:
    """Vocabulary rounded up to a multiple of ``vocab_multiple * tp`` (Megatron-LM's
    ``make_vocab_size_divisible_by``): even shards and matmul-friendly sizes. Padded
    rows are never targets and are masked out of the loss and of sampling."""
    m = max(1, cfg.vocab_multiple) * tp
    return -(-cfg.vocab_size // m) * m


# How tensor parallelism splits each module (Shoeybi et al. 2019). Checked against
# the model by tests/test_tensor_parallel.py.
TP_PLAN = {
    "tok_emb": "vocab",  # VocabParallelEmbedding: rows split, partial lookups all-reduced
    "pos_emb": "replicated",
    "blocks.*.attn_norm": "replicated (sequence-split with SP)",
    "blocks.*.attn.wq": "column",
    "blocks.*.attn.wk": "column (replicated when n_kv_heads < tp)",
    "blocks.*.attn.wv": "column (replicated when n_kv_heads < tp)",
    "blocks.*.attn.wo": "row",
    "blocks.*.mlp_norm": "replicated (sequence-split with SP)",
    "blocks.*.mlp.w1": "column",
    "blocks.*.mlp.w3": "column",
    "blocks.*.mlp.w2": "row",
    "norm": "replicated (sequence-split with SP)",
    "head": "column over the vocabulary (tied to tok_emb for gpt2), vocab-parallel cross entropy",
}


class GPT(nn.Module):
    """Token embedding -> ``n_layers`` pre-norm blocks -> final norm -> vocabulary head.

    ``forward(tokens, labels)`` returns the mean next-token cross entropy;
    ``forward(tokens)`` returns logits (B, T, V) over the real (unpadded) vocabulary.

    Args:
        cfg: model shape.
        tp_group: tensor-parallel process group (``None``: unsharded model).
        sequence_parallel: split the residual stream over the sequence within the
            TP group (Korthikanti et al. 2022); norms and dropout run on T/tp tokens.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        validate_model_config(cfg)
        tp = tp_size(tp_group)
        self.cfg, self.group = cfg, tp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.sp_group = tp_group if self.sequence_parallel else None
        self.vocab_padded = padded_vocab_size(cfg, tp)
        self.tok_emb = VocabParallelEmbedding(
            self.vocab_padded, cfg.d_model, tp_group, self.sequence_parallel
        )
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, tp_group, self.sequence_parallel) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, self.sp_group)
        self.head = ColumnParallelLinear(cfg.d_model, self.vocab_padded, False, tp_group)
        if ties_embeddings(cfg):
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std) for weights; residual output projections get
        ``init_std / sqrt(2 n_layers)`` (GPT-2, Radford et al. 2019, section 2.3;
        Megatron-LM ``scaled_init_method_normal``). Biases zero, norm gains one.
        Sharded weights are drawn at full size from the same RNG stream on every
        rank and sliced, so any TP degree gives the TP=1 weights."""
        std = self.cfg.init_std
        if getattr(module, "residual_proj", False):
            std = std / math.sqrt(2 * self.cfg.n_layers)
        if module is self.head and ties_embeddings(self.cfg):
            return
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            full = torch.empty(module.out_features, module.in_features)
            module.weight.data.copy_(module.shard(nn.init.normal_(full, 0.0, std)))
        elif isinstance(module, VocabParallelEmbedding):
            full = torch.empty(module.num_embeddings, module.dim)
            module.weight.data.copy_(module.shard(nn.init.normal_(full, 0.0, std)))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
        if getattr(module, "bias", None) is not None and not isinstance(module, LayerNorm):
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, labels: (B, T) int64. Returns logits (B, T, V) or a scalar loss."""
        B, T = tokens.shape
        if self.cfg.seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len={self.cfg.seq_len}")
        tp = tp_size(self.group)
        if self.sequence_parallel and T % tp:
            if labels is not None:
                raise ValueError(f"sequence parallelism needs T ({T}) divisible by tp ({tp})")
            # Inference on any length (e.g. sampling): right-pad; causal attention keeps the
            # first T positions independent of the padding.
            return self.forward(F.pad(tokens, (0, tp - T % tp)))[:, :T]
        x = self.tok_emb(tokens)  # (B, T, C), or (B, T/tp, C) with SP
        if self.pos_emb is not None:
            pos = torch.arange(T, device=tokens.device)
            if self.sequence_parallel:  # this rank's tokens; the table's gradient is summed over TP
                pos = pos.chunk(tp_size(self.group))[tp_rank(self.group)]
            x = x + F.embedding(pos, copy_to_tp(self.pos_emb.weight, self.sp_group))
        x = dropout(x, self.cfg.dropout, self.training, self.sp_group)
        for block in self.blocks:
            x = block(x)
        x = enter_tp(self.norm(x), self.group, self.sequence_parallel)  # (B, T, C)
        logits = self.head(x)  # (B, T, V_padded/tp)
        if labels is None:
            return gather_logits(logits, self.group, self.cfg.vocab_size)
        loss = vocab_parallel_cross_entropy(
            logits.view(B * T, -1),
            labels.reshape(B * T),
            self.group,
            tp_rank(self.group) * logits.size(-1),
            self.cfg.vocab_size,
            self.cfg.kernels,
        )
        return loss.mean()
