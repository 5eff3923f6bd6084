"""Plain PyTorch attention: the definition of correct, and the CPU fallback.

``attention_reference`` is the math, written out (materializes the (T, T) score
matrix). ``attention_sdpa`` is what ``impl="torch"`` runs: PyTorch's
``F.scaled_dot_product_attention`` with the same masking rules.

Masking rules shared by every path (query position i, key position j, both in
one sequence of length T):

* ``causal``: key j is visible to query i only if ``j <= i`` (top-left aligned,
  as ``F.scaled_dot_product_attention(is_causal=True)``).
* ``doc_ids`` (B, T): key j is visible to query i only if
  ``doc_ids[b, i] == doc_ids[b, j]`` (packed sequences never attend across a
  document boundary).

Query head h reads key/value head ``h // (Hq // Hkv)`` (grouped-query
attention, the same grouping as ``repeat_interleave`` on the head dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_mask(
    seq_len: int,
    *,
    causal: bool,
    doc_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean visibility mask, True = may attend.

    Args:
        seq_len: T.
        causal: apply ``j <= i``.
        doc_ids: (B, T) document ids, or None.
        device: where to build the mask.

    Returns:
        (B, 1, T, T) or (1, 1, T, T) bool mask, or None when nothing is masked.
    """
    mask = None
    if causal:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    if doc_ids is not None:
        same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # (B, 1, T, T)
        mask = same_doc if mask is None else mask & same_doc
    return mask


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"expected q (B, Hq, T, D), k and v (B, Hkv, T, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or hq % k.shape[1] != 0:
        raise ValueError(
            f"k/v {tuple(k.shape)} incompatible with q {tuple(q.shape)}: need same B, T, D "
            "and kv heads dividing q heads"
        )
    return hq // k.shape[1]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V, computed in fp32 (fp64 if given fp64).

    Args:
        q: (B, Hq, T, D).
        k: (B, Hkv, T, D), Hq % Hkv == 0.
        v: (B, Hkv, T, D).
        causal: mask keys after the query.
        softmax_scale: defaults to 1 / sqrt(D).
        doc_ids: (B, T) integer document ids, or None.

    Returns:
        (B, Hq, T, D) in q's dtype.
    """
    group = check_shapes(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(compute).repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    scores = q.to(compute) @ kf.transpose(-1, -2) * scale  # (B, Hq, T, T)
    mask = attention_mask(q.shape[2], causal=causal, doc_ids=doc_ids, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:  # a row with no visible key gives zeros, never NaN
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return (probs @ vf).to(q.dtype)


def _sdpa_has_gqa() -> bool:
    """``enable_gqa`` arrived in torch 2.5 (builtins have no inspectable signature)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``impl="torch"`` path: ``F.scaled_dot_product_attention``.

    Same arguments and result as :func:`attention_reference`. Without
    ``doc_ids`` it uses ``is_causal`` (flash / memory-efficient backends on
    CUDA); with ``doc_ids`` it passes an explicit (B, 1, T, T) boolean mask.
    """
    group = check_shapes(q, k, v)
    kwargs: dict = {}
    if group > 1:
        if _sdpa_has_gqa():
            kwargs["enable_gqa"] = True
        else:  # torch < 2.5: materialize the repeat
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, **kwargs)
    mask = attention_mask(q.shape[2], causal=causal, doc_ids=doc_ids, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, **kwargs)
