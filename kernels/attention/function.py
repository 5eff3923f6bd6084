"""Launchers and tile selection for flash attention (kernels in ``kernel.py``).

The custom ops built on these launchers are in ``ops.py``; the public entry
points are ``kernels.flash_attention``, ``kernels.attention_forward`` and
``kernels.attention_backward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from kernels.dispatch import interpreted, needs_fp32_dot
from kernels.interpreter import kernel_module, launcher

LOG2E = 1.4426950408889634
KERNELS = "kernels.attention.kernel"


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


def select_config(q: torch.Tensor) -> AttentionConfig:
    """Pick tiles by head dim, dtype and device (a fixed table; no autotuning, no device query).

    Untuned first guesses (no GPU run recorded yet). Interpreted launches (CPU)
    use small tiles so short test sequences still span several blocks.
    """
    head_dim, dtype = q.shape[-1], q.dtype
    if interpreted(q):
        return AttentionConfig(32, 16, 16, 32, 32, 16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # ieee fp32 dots: keep shared memory small
        return AttentionConfig(32, 32, 16, 32, 32, 16, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return AttentionConfig(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=3)
    return AttentionConfig(128, 64, 32, 64, 64, 32, num_warps=8, num_stages=2)


def default_scale(head_dim: int) -> float:
    """1 / sqrt(D), the scale of Vaswani et al. (2017), eq. 1."""
    return 1.0 / math.sqrt(head_dim)


def _doc_args(
    doc_ids: torch.Tensor | None, kv_doc_ids: torch.Tensor | None, placeholder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
    """(DOC_Q, DOC_K, their four strides); placeholders when there are no doc ids."""
    if doc_ids is None:
        return placeholder, placeholder, (0, 0, 0, 0)
    kv = kv_doc_ids if kv_doc_ids is not None else doc_ids
    return doc_ids, kv, (*doc_ids.stride(), *kv.stride())


def _flags(q: torch.Tensor, k: torch.Tensor, causal: bool, has_doc: bool, config: AttentionConfig) -> dict:
    fp32_dots = q.dtype == torch.float32 or needs_fp32_dot(q)
    return dict(
        GROUP=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), CAUSAL=causal, HAS_DOC=has_doc,
        UPCAST_DOT=needs_fp32_dot(q), PRECISION="ieee" if fp32_dots else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def attention_fwd_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    kv_doc_ids: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Returns:
        out (B, Hq, Tq, D) contiguous in q's dtype; lse (B, Hq, Tq) fp32, natural log,
        -inf on rows that see no key.
    """
    config = config or select_config(q)
    b, hq, tq, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    doc_q, doc_k, doc_strides = _doc_args(doc_ids, kv_doc_ids, lse)
    grid = (triton.cdiv(tq, config.fwd_block_m), b * hq)
    launcher(kernel_module(KERNELS)._attention_fwd_kernel, q)[grid](
        q, k, v, out, lse, doc_q, doc_k,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *doc_strides,
        hq, tq, k.shape[2], softmax_scale * LOG2E,
        BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n,
        **_flags(q, k, causal, doc_ids is not None, config),
    )  # fmt: skip
    return out, lse


def attention_bwd_launch(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    doc_ids: torch.Tensor | None,
    kv_doc_ids: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    grad_lse: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch preprocess, dK/dV and dQ kernels. Returns (dq, dk, dv) like q, k, v.

    ``out`` and ``lse`` may be the global output and logsumexp of a larger attention
    of which (k, v) is one block. ``grad_lse`` (B, Hq, Tq), when the logsumexp
    output itself has a gradient: ``dlse/dS = P``, so it enters as
    ``delta <- delta - grad_lse`` in ``dS = P * (dP - delta)``.
    """
    config = config or select_config(q)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    kern = kernel_module(KERNELS)
    lse = lse.float().contiguous()
    delta = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    launcher(kern._attention_bwd_preprocess_kernel, q)[(triton.cdiv(tq, config.dq_block_m), b * hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), hq, tq,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=config.dq_block_m,
    )  # fmt: skip
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    doc_q, doc_k, doc_strides = _doc_args(doc_ids, kv_doc_ids, lse)
    flags = _flags(q, k, causal, doc_ids is not None, config)
    scale_log2 = softmax_scale * LOG2E
    launcher(kern._attention_bwd_dkdv_kernel, q)[(triton.cdiv(tk, config.dkdv_block_n), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, doc_q, doc_k,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
        *dv.stride(), *doc_strides, hq, hkv, tq, tk, scale_log2, softmax_scale,
        BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n, **flags,
    )  # fmt: skip
    launcher(kern._attention_bwd_dq_kernel, q)[(triton.cdiv(tq, config.dq_block_m), b * hq)](
        q, k, v, grad_out, lse, delta, dq, doc_q, doc_k,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *doc_strides, hq, tq, tk, scale_log2, softmax_scale,
        BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, **flags,
    )  # fmt: skip
    return dq, dk, dv
