"""Unfused attention: Q K^T, the fused scale-mask-softmax kernel, then P V.

Megatron-LM's ``FusedScaleMaskSoftmax`` path: the (Tq, Tk) scores are
materialized, so it suits short sequences, arbitrary masks and the KV-cache
decode step (a few query rows against a cache of Tk keys), where a flash kernel
has little to tile. The softmax (scale, causal/explicit mask, forward and
backward) is :func:`kernels.scaled_masked_softmax` (Triton or PyTorch by
``impl``); the two matmuls are PyTorch's in the inputs' dtype.

Grouped-query attention without repeating K/V: q (B, Hq, Tq, D) is viewed as
(B, Hkv, G * Tq, D), so one batched matmul per kv head serves its G query heads.
"""

from __future__ import annotations

import torch

from kernels.attention.reference import check_shapes
from kernels.softmax import scaled_masked_softmax


def unfused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
    q_offset: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """softmax(Q K^T * scale, masked) V with the scores materialized.

    Args:
        q: (B, Hq, Tq, D).
        k, v: (B, Hkv, Tk, D), Hq % Hkv == 0.
        causal: query row i sees key j only if ``j <= i + q_offset``.
        softmax_scale: defaults to 1 / sqrt(D).
        mask: bool, True = masked out, broadcastable to (B, Hq, Tq, Tk), or None.
        doc_ids: (B, Tq) document ids of the queries, or None.
        kv_doc_ids: (B, Tk) document ids of the keys; defaults to ``doc_ids`` (then
            Tq == Tk).
        q_offset: position of query row 0 among the keys; default ``Tk - Tq`` (the
            queries are the last Tq positions: a KV-cache step, or plain causal
            self-attention when Tq == Tk).
        impl: "auto" | "triton" | "torch" for the softmax (see kernels/dispatch.py).

    Returns:
        (B, Hq, Tq, D) in q's dtype; rows with no visible key are 0. Differentiable
        w.r.t. q, k and v.
    """
    group = check_shapes(q, k, v, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    if doc_ids is not None:
        kv = kv_doc_ids if kv_doc_ids is not None else doc_ids
        other_doc = (doc_ids[:, :, None] != kv[:, None, :])[:, None]  # (B, 1, Tq, Tk)
        mask = other_doc if mask is None else mask | other_doc
    scores = q.reshape(b, hkv, group * tq, d) @ k.transpose(-1, -2)  # (B, Hkv, G*Tq, Tk)
    probs = scaled_masked_softmax(
        scores.view(b, hq, tq, tk),
        scale=scale,
        mask=mask,
        causal=causal,
        q_offset=tk - tq if q_offset is None else q_offset,
        impl=impl,
    )  # (B, Hq, Tq, Tk)
    out = probs.reshape(b, hkv, group * tq, tk) @ v  # (B, Hkv, G*Tq, D)
    return out.reshape(b, hq, tq, d)
