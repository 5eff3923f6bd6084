"""Transformer building blocks: norms, rotary embeddings, attention, MLPs.

Plain ``nn.Module`` code; a model built from these with TP=1, PP=1 is an
ordinary PyTorch model. Shapes use B=batch, T=sequence, C=d_model,
nh=query heads, nkv=key/value heads, hs=head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import flash_attention, layer_norm, rms_norm
from megalm.config import ModelConfig
from megalm.parallel.context import cp_size, local_positions
from megalm.parallel.dropout import dropout
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp
from megalm.parallel.mappings import copy_to_tp, tp_rank, tp_size
from megalm.parallel.ring import ring_attention


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * g``.

    ``sp_group``: with sequence parallelism each rank normalizes its own tokens, so
    the gain's gradient is summed over the TP group (:func:`copy_to_tp`).
    """

    def __init__(self, dim: int, eps: float = 1e-5, sp_group=None, kernels: str = "auto") -> None:
        super().__init__()
        self.eps, self.sp_group, self.kernels = eps, sp_group, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C); statistics in fp32 (:func:`kernels.rms_norm`)."""
        return rms_norm(x, copy_to_tp(self.weight, self.sp_group), self.eps, impl=self.kernels)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) with gain and bias; ``sp_group`` as in :class:`RMSNorm`."""

    def __init__(self, dim: int, eps: float = 1e-5, sp_group=None, kernels: str = "auto") -> None:
        super().__init__()
        self.eps, self.sp_group, self.kernels = eps, sp_group, kernels
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C) (:func:`kernels.layer_norm`)."""
        w, b = copy_to_tp(self.weight, self.sp_group), copy_to_tp(self.bias, self.sp_group)
        return layer_norm(x, w, b, self.eps, impl=self.kernels)


def make_norm(cfg: ModelConfig, sp_group=None) -> nn.Module:
    """RMSNorm for llama, LayerNorm (with bias) for gpt2."""
    if cfg.family == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps, sp_group, cfg.kernels)
    return LayerNorm(cfg.d_model, cfg.norm_eps, sp_group, cfg.kernels)


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, h, T, hs) -> same shape, rotated by position (``positions`` (T,), default 0..T-1)."""
        T = x.size(-2)
        if positions is None:
            cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        else:
            cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention (Ainslie et al. 2023 for GQA).

    Tensor parallel (Shoeybi et al. 2019, Fig. 3b): query heads are split over TP
    ranks (``wq`` column-parallel, ``wo`` row-parallel). Key/value heads are split
    too when ``n_kv_heads >= tp``; when ``n_kv_heads < tp`` each rank computes the
    one K/V head its query heads use from a replicated ``wk``/``wv`` whose gradient
    is summed over TP.

    Context parallel (``cp_group``): the input holds this rank's tokens of each sequence
    (:mod:`megalm.parallel.context`); RoPE uses their global positions and the
    attention is :func:`megalm.parallel.ring.ring_attention` over the cp group.
    """

    def __init__(self, cfg: ModelConfig, group=None, sequence_parallel: bool = False, cp_group=None) -> None:
        super().__init__()
        tp = tp_size(group)
        C, hs, n_kv = cfg.d_model, cfg.head_size, cfg.kv_heads
        self.group, self.sequence_parallel, self.head_size = group, sequence_parallel, hs
        self.cp_group = cp_group if cp_size(cp_group) > 1 else None
        self.local_heads = cfg.n_heads // tp
        self.kv_replicated = n_kv < tp
        self.local_kv_heads = 1 if self.kv_replicated else n_kv // tp
        bias = cfg.family == "gpt2"
        self.wq = ColumnParallelLinear(C, C, bias, group)
        if self.kv_replicated:
            # Whole (unsplit) projections on every rank: group=None.
            self.wk = ColumnParallelLinear(C, n_kv * hs, bias, None)
            self.wv = ColumnParallelLinear(C, n_kv * hs, bias, None)
            kv_index = tp_rank(group) // (tp // n_kv)
            self.kv_rows = slice(kv_index * hs, (kv_index + 1) * hs)
        else:
            self.wk = ColumnParallelLinear(C, n_kv * hs, bias, group)
            self.wv = ColumnParallelLinear(C, n_kv * hs, bias, group)
        self.wo = RowParallelLinear(C, C, bias, group, sequence_parallel)
        self.wo.residual_proj = True  # scaled init, see GPT._init_weights
        self.rotary = Rotary(hs, cfg.seq_len, cfg.rope_theta) if cfg.family == "llama" else None
        self.kernels = cfg.kernels

    def _kv(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.kv_replicated:
            return proj(x)
        w = copy_to_tp(proj.weight, self.group)[self.kv_rows]
        b = copy_to_tp(proj.bias, self.group)[self.kv_rows] if proj.bias is not None else None
        return F.linear(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), or (B, T/tp, C) with SP -> same shape."""
        x = enter_tp(x, self.group, self.sequence_parallel)  # (B, T, C)
        B, T, _ = x.shape
        hs = self.head_size
        q = self.wq(x).view(B, T, self.local_heads, hs).transpose(1, 2)  # (B, nh/tp, T, hs)
        k = self._kv(self.wk, x).view(B, T, self.local_kv_heads, hs).transpose(1, 2)  # (B, nkv', T, hs)
        v = self._kv(self.wv, x).view(B, T, self.local_kv_heads, hs).transpose(1, 2)  # (B, nkv', T, hs)
        if self.rotary is not None:
            pos = None if self.cp_group is None else local_positions(T, self.cp_group, x.device)
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        # softmax(q k^T / sqrt(hs) + causal mask) v: FlashAttention-2 in Triton on CUDA, SDPA
        # elsewhere (model.kernels); GQA without repeating K/V.
        if self.cp_group is not None:
            y = ring_attention(q, k, v, self.cp_group, impl=self.kernels)  # (B, nh/tp, T, hs)
        else:
            y = flash_attention(q, k, v, causal=True, impl=self.kernels)  # (B, nh/tp, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.local_heads * hs)  # (B, T, C/tp)
        return self.wo(y)


class MLP(nn.Module):
    """Position-wise MLP: SwiGLU ``W2 (silu(W1 x) * W3 x)`` (llama) or ``W2 gelu(W1 x)`` (gpt2).

    Tensor parallel: ``W1``/``W3`` column-parallel, ``W2`` row-parallel, so the
    nonlinearity runs on local columns without communication.
    """

    def __init__(self, cfg: ModelConfig, group=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        hidden = cfg.ffn_size  # ModelConfig.ffn_size: 4d (gpt2) or SwiGLU's 8d/3
        gated = cfg.family == "llama"
        self.group, self.sequence_parallel = group, sequence_parallel
        self.w1 = ColumnParallelLinear(cfg.d_model, hidden, not gated, group)
        self.w3 = ColumnParallelLinear(cfg.d_model, hidden, False, group) if gated else None
        self.w2 = RowParallelLinear(hidden, cfg.d_model, not gated, group, sequence_parallel)
        self.w2.residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), or (B, T/tp, C) with SP -> same shape."""
        x = enter_tp(x, self.group, self.sequence_parallel)
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: ``x + Attn(N(x))`` then ``x + MLP(N(x))``."""

    def __init__(self, cfg: ModelConfig, group=None, sequence_parallel: bool = False, cp_group=None) -> None:
        super().__init__()
        self.sp_group = group if sequence_parallel else None
        self.cp_group = cp_group
        self.dropout = cfg.dropout
        self.attn_norm = make_norm(cfg, self.sp_group)
        self.attn = Attention(cfg, group, sequence_parallel, cp_group)
        self.mlp_norm = make_norm(cfg, self.sp_group)
        self.mlp = MLP(cfg, group, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), or (B, T/tp, C) with SP -> same shape."""
        x = x + dropout(
            self.attn(self.attn_norm(x)), self.dropout, self.training, self.sp_group, self.cp_group
        )
        return x + dropout(
            self.mlp(self.mlp_norm(x)), self.dropout, self.training, self.sp_group, self.cp_group
        )
