"""Transformer building blocks: norms, rotary embeddings, attention, MLPs.

Plain ``nn.Module`` code; a model built from these with TP=1, PP=1 is an
ordinary PyTorch model. Shapes use B=batch, T=sequence, C=d_model,
nh=query heads, nkv=key/value heads, hs=head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * g``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C); statistics in fp32."""
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm for llama, LayerNorm (with bias) for gpt2."""
    if cfg.family == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34), rotate-half layout.

    For position m and channel pair (i, i + hs/2) with frequency
    ``theta_i = base^(-2i/hs)``: ``x'_i = x_i cos(m theta_i) - x_{i+hs/2} sin(m theta_i)``.
    """

    def __init__(self, head_size: int, max_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, h, T, hs) -> same shape, rotated by position."""
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal softmax attention ``softmax(q k^T / sqrt(hs) + M) v`` via SDPA.

    Args:
        q: (B, nh, T, hs); k, v: (B, nkv, T, hs) with ``nh % nkv == 0`` (GQA,
            no repeated K/V materialized by the caller).

    Returns:
        (B, nh, T, hs).
    """
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=k.size(1) != q.size(1)
    )


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention (Ainslie et al. 2023 for GQA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_size = cfg.d_model // cfg.n_heads
        bias = cfg.family == "gpt2"
        kv_dim = self.n_kv_heads * self.head_size
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=bias)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.wo.residual_proj = True  # scaled init, see GPT._init_weights
        self.rotary = Rotary(self.head_size, cfg.seq_len, cfg.rope_theta) if cfg.family == "llama" else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """MLP width: ``cfg.ffn_hidden`` or the family default.

    gpt2: ``4 C``. llama: ``2/3 * 4 C`` rounded up to a multiple of 64, so the three
    SwiGLU matrices hold about as many parameters as a ``4 C`` GELU MLP
    (Shazeer 2020, section 2; Touvron et al. 2023).
    """
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    if cfg.family == "gpt2":
        return 4 * cfg.d_model
    return 64 * math.ceil(int(2 * 4 * cfg.d_model / 3) / 64)


class MLP(nn.Module):
    """Position-wise MLP: SwiGLU ``W2 (silu(W1 x) * W3 x)`` (llama) or ``W2 gelu(W1 x)`` (gpt2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gated = cfg.family == "llama"
        bias = not self.gated
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=bias)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False) if self.gated else None
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=bias)
        self.w2.residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: ``x + Attn(N(x))`` then ``x + MLP(N(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))
