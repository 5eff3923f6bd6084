"""Plain PyTorch scale + mask + softmax: the definition of correct and the CPU fallback.

The op of Megatron-LM's fused ``scaled_masked_softmax`` and
``scaled_upper_triang_masked_softmax``: ``y = softmax(scale * x  masked)`` over the
last dim, where masked entries are removed (-inf) before the softmax. Rules:

* ``mask``: bool, True = masked out, broadcastable to ``scores``.
* ``causal``: key j is masked for query row i when ``j > i + q_offset`` (rows are
  the second-to-last dim; ``q_offset = 0`` is top-left aligned, ``Tk - Tq`` puts the
  queries at the end of the keys, as a KV-cache decode step needs), combined with
  ``mask`` when both are given.
* A row whose entries are all masked gives zeros (not NaN).
* Otherwise values follow ``torch.softmax``: NaN or +inf in an unmasked entry
  makes its row NaN; masked entries never contribute, whatever their value.

Computed in fp32 (fp64 for fp64 input); the result has the input's dtype.
"""

from __future__ import annotations

import torch


def softmax_mask(
    scores_shape: torch.Size,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
    q_offset: int = 0,
) -> torch.Tensor | None:
    """Combined bool mask (True = masked), broadcastable to ``scores_shape``, or None."""
    combined = mask
    if causal and q_offset < scores_shape[-1] - 1:  # else no key lies past any query (one-row decode)
        tq, tk = scores_shape[-2], scores_shape[-1]
        upper = torch.ones(tq, tk, dtype=torch.bool, device=device).triu(diagonal=1 + q_offset)
        combined = upper if combined is None else combined | upper
    return combined


def scaled_masked_softmax_reference(
    scores: torch.Tensor,
    *,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    q_offset: int = 0,
) -> torch.Tensor:
    """softmax(scale * scores, masked) over the last dim.

    Args:
        scores: (..., Tq, Tk) attention scores (any float dtype).
        scale: multiplier applied before masking and softmax.
        mask: bool, True = masked out, broadcastable to ``scores``; or None.
        causal: additionally mask keys j > query row i + q_offset.
        q_offset: position of query row 0 among the keys, for ``causal``.

    Returns:
        Probabilities, same shape and dtype as ``scores``; fully masked rows are 0.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = masked out), got {mask.dtype}")
    if causal and scores.dim() < 2:
        raise ValueError("causal softmax needs scores of shape (..., Tq, Tk)")
    compute = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.to(compute) * scale
    masked = softmax_mask(scores.shape, mask=mask, causal=causal, device=scores.device, q_offset=q_offset)
    if masked is None:
        return torch.softmax(x, dim=-1).to(scores.dtype)
    x = x.masked_fill(masked, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    all_masked = torch.broadcast_to(masked, x.shape).all(dim=-1, keepdim=True)
    return probs.masked_fill(all_masked, 0.0).to(scores.dtype)
