"""Launchers, tile selection and the ``torch.autograd.Function`` for flash attention.

The Triton kernels and their header (algorithm, what was tested, known limits)
are in ``kernel.py``; the public entry point is ``kernels.flash_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from kernels.attention.kernel import (
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_preprocess_kernel,
    _attention_fwd_kernel,
)
from kernels.dispatch import interpreter_enabled, interpreter_needs_fp32_dot

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch parameters for the three attention kernels.

    Requires ``fwd_block_m % fwd_block_n == 0``, ``dkdv_block_n % dkdv_block_m == 0``
    and ``dq_block_m % dq_block_n == 0`` (the causal split is on block boundaries).
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    dq_block_m: int = 64
    dq_block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if (
            self.fwd_block_m % self.fwd_block_n
            or self.dkdv_block_n % self.dkdv_block_m
            or self.dq_block_m % self.dq_block_n
        ):
            raise ValueError(f"attention tiles must nest for the causal split: {self}")


def select_config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """Pick tiles by head dim and dtype (a fixed table; no autotuning, no device query).

    Untuned first guesses (no GPU run recorded yet). Under the interpreter the
    tiles are small so short test sequences still span several blocks.
    """
    if interpreter_enabled():
        return AttentionConfig(32, 16, 16, 32, 32, 16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # ieee fp32 dots: keep shared memory small
        return AttentionConfig(32, 32, 16, 32, 32, 16, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return AttentionConfig(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=3)
    return AttentionConfig(128, 64, 32, 64, 64, 32, num_warps=8, num_stages=2)


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _common(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int, int, str]:
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    block_d = max(16, triton.next_power_of_2(d))
    fp32_dots = q.dtype == torch.float32 or interpreter_needs_fp32_dot(q.dtype)
    precision = "ieee" if fp32_dots else "tf32"  # ignored for bf16/fp16 operands
    return b, hq, hkv, t, d, block_d, precision


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    doc_ids: torch.Tensor | None,
    config: AttentionConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Returns:
        out (B, Hq, T, D) in q's dtype and lse (B, Hq, T) fp32 in log2 units.
    """
    b, hq, hkv, t, d, block_d, precision = _common(q, k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    doc = doc_ids if doc_ids is not None else lse  # unused pointer when HAS_DOC is False
    grid = (triton.cdiv(t, config.fwd_block_m), b * hq)
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, doc,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_strides(doc_ids, 2),
        hq, t, softmax_scale * LOG2E,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n, CAUSAL=causal,
        HAS_DOC=doc_ids is not None, UPCAST_DOT=interpreter_needs_fp32_dot(q.dtype),
        PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out, lse


def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    doc_ids: torch.Tensor | None,
    config: AttentionConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels. Returns (dq, dk, dv) like q, k, v."""
    b, hq, hkv, t, d, block_d, precision = _common(q, k)
    delta = torch.empty((b, hq, t), dtype=torch.float32, device=q.device)
    _attention_bwd_preprocess_kernel[(triton.cdiv(t, config.dq_block_m), b * hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), hq, t,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=config.dq_block_m,
    )  # fmt: skip
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    doc = doc_ids if doc_ids is not None else lse
    flags = dict(
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal,
        HAS_DOC=doc_ids is not None, UPCAST_DOT=interpreter_needs_fp32_dot(q.dtype),
        PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    scale_log2 = softmax_scale * LOG2E
    _attention_bwd_dkdv_kernel[(triton.cdiv(t, config.dkdv_block_n), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, doc,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
        *dv.stride(), *_strides(doc_ids, 2), hq, hkv, t, scale_log2, softmax_scale,
        BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n, **flags,
    )  # fmt: skip
    _attention_bwd_dq_kernel[(triton.cdiv(t, config.dq_block_m), b * hq)](
        q, k, v, grad_out, lse, delta, dq, doc,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *_strides(doc_ids, 2), hq, t, scale_log2, softmax_scale,
        BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, **flags,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the logsumexp; recomputes P in backward."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        softmax_scale: float,
        doc_ids: torch.Tensor | None,
        config: AttentionConfig,
    ) -> torch.Tensor:
        out, lse = flash_attention_forward(
            q, k, v, causal=causal, softmax_scale=softmax_scale, doc_ids=doc_ids, config=config
        )
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.causal, ctx.softmax_scale, ctx.config = causal, softmax_scale, config
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(
            grad_out, q, k, v, out, lse, causal=ctx.causal, softmax_scale=ctx.softmax_scale,
            doc_ids=doc_ids, config=ctx.config,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def default_scale(head_dim: int) -> float:
    """1 / sqrt(D), the scale of Vaswani et al. (2017), eq. 1."""
    return 1.0 / math.sqrt(head_dim)
