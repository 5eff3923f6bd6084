"""Fused scale + mask + softmax (Megatron's scaled_masked_softmax), Triton or PyTorch."""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.softmax.ops import softmax_fwd
from kernels.softmax.reference import scaled_masked_softmax_reference

__all__ = ["scaled_masked_softmax", "scaled_masked_softmax_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def scaled_masked_softmax(
    scores: torch.Tensor,
    *,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    q_offset: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """softmax(scale * scores) over the last dim with masked entries removed.

    Args:
        scores: (..., Tq, Tk) scores, e.g. (B, H, Tq, Tk) attention logits.
        scale: multiplier applied before masking (e.g. 1 / sqrt(head_dim)).
        mask: bool, True = masked out, broadcastable to ``scores`` (e.g. (B, 1, Tq, Tk));
            broadcast by strides on the Triton path, never materialized.
        causal: additionally mask key j for query row i when j > i + q_offset.
        q_offset: position of query row 0 among the keys (0: top-left aligned;
            Tk - Tq: the queries are the last Tq positions, e.g. Tk - 1 for a one-row
            decode step against a KV cache of Tk keys).
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        Probabilities shaped and typed like ``scores`` (contiguous); rows with every
        entry masked are zeros. Differentiable w.r.t. ``scores``.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = masked out), got {mask.dtype}")
    if causal and scores.dim() < 2:
        raise ValueError("causal softmax needs scores of shape (..., Tq, Tk)")
    if mask is not None:
        torch.broadcast_shapes(mask.shape, scores.shape)  # raises with both shapes
    kw = dict(scale=scale, mask=mask, causal=causal, q_offset=q_offset)
    if not use_triton(impl, scores, mask, op="softmax") or scores.dtype not in _TRITON_DTYPES:
        return scaled_masked_softmax_reference(scores, **kw)
    return softmax_fwd(scores, mask, float(scale), causal, int(q_offset))
