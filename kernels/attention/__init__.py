"""Attention: FlashAttention-2 in Triton, with SDPA / plain-math fallbacks."""

from __future__ import annotations

import torch

from kernels.attention.reference import attention_reference, attention_sdpa, check_shapes
from kernels.dispatch import device_guard, use_triton

__all__ = ["attention_reference", "attention_sdpa", "flash_attention", "triton_supports"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these inputs (else the public function falls back).

    Head dim a multiple of 16 in [16, 128]; fp16, bf16 or fp32; q, k, v of one dtype.
    """
    d = q.shape[-1]
    return d % 16 == 0 and 16 <= d <= 128 and q.dtype in _TRITON_DTYPES and q.dtype == k.dtype == v.dtype


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V with FlashAttention-2 (Dao 2023) on the Triton path.

    Args:
        q: (B, Hq, T, D) queries (any strides).
        k: (B, Hkv, T, D) keys, Hq % Hkv == 0 (grouped-query attention; query head h
            reads kv head h // (Hq // Hkv); K/V are never repeated in memory).
        v: (B, Hkv, T, D) values.
        causal: query i sees keys j <= i (top-left aligned).
        softmax_scale: defaults to 1 / sqrt(D).
        doc_ids: (B, T) integer document ids for packed sequences, or None; query i
            sees key j only when both carry the same id.
        impl: "auto" (Triton on CUDA, SDPA elsewhere), "triton" or "torch" (SDPA);
            see kernels/dispatch.py. Inputs the kernels do not support (head dim not a
            multiple of 16 or above 128, fp64) take the SDPA path even with "triton".

    Returns:
        (B, Hq, T, D) in q's dtype; differentiable w.r.t. q, k and v.
    """
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, doc_ids=doc_ids)
    if not use_triton(impl, q, k, v, doc_ids) or not triton_supports(q, k, v):
        return attention_sdpa(q, k, v, **kwargs)
    from kernels.attention.function import FlashAttentionFunction, default_scale, select_config

    check_shapes(q, k, v)
    if doc_ids is not None and tuple(doc_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids must be (B, T) = {(q.shape[0], q.shape[2])}, got {doc_ids.shape}")
    scale = softmax_scale if softmax_scale is not None else default_scale(q.shape[-1])
    config = select_config(q.shape[-1], q.dtype)
    with device_guard(q):
        return FlashAttentionFunction.apply(q, k, v, causal, scale, doc_ids, config)
