"""Plain PyTorch attention: the definition of correct, and the CPU fallback.

``attention_forward_reference`` / ``attention_backward_reference`` are the math
written out (they materialize the (Tq, Tk) score matrix): the forward returns the
output and the row logsumexp, the backward takes the output and logsumexp as
inputs (FlashAttention-2's backward, Dao 2023 Alg. 2), so a caller may pass the
global output and logsumexp of a larger attention. ``attention_sdpa`` is what
``flash_attention(impl="torch")`` runs: ``F.scaled_dot_product_attention`` with
the same masking rules.

Masking rules shared by every path (query position i, key position j):

* ``causal``: key j is visible to query i only if ``j <= i`` (top-left aligned,
  as ``F.scaled_dot_product_attention(is_causal=True)``); needs Tq == Tk.
* ``doc_ids`` (B, Tq) and ``kv_doc_ids`` (B, Tk) (default: ``doc_ids``): key j is
  visible to query i only if ``doc_ids[b, i] == kv_doc_ids[b, j]`` (packed
  sequences never attend across a document boundary).
* A query that sees no key gets output 0 and logsumexp -inf.

Query head h reads key/value head ``h // (Hq // Hkv)`` (grouped-query
attention, the same grouping as ``repeat_interleave`` on the head dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_mask(
    tq: int,
    tk: int,
    *,
    causal: bool,
    doc_ids: torch.Tensor | None,
    kv_doc_ids: torch.Tensor | None = None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean visibility mask, True = may attend.

    Args:
        tq: query length. tk: key length.
        causal: apply ``j <= i``.
        doc_ids: (B, Tq) query document ids, or None.
        kv_doc_ids: (B, Tk) key document ids; defaults to ``doc_ids``.
        device: where to build the mask.

    Returns:
        (B, 1, Tq, Tk) or (1, 1, Tq, Tk) bool mask, or None when nothing is masked.
    """
    mask = None
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril()[None, None]
    if doc_ids is not None:
        kv = kv_doc_ids if kv_doc_ids is not None else doc_ids
        same_doc = (doc_ids[:, :, None] == kv[:, None, :])[:, None]  # (B, 1, Tq, Tk)
        mask = same_doc if mask is None else mask & same_doc
    return mask


def check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
) -> int:
    """Validate q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) and the doc ids; return Hq // Hkv."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"expected q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, hq, tq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1] != 0:
        raise ValueError(
            f"k/v {tuple(k.shape)} incompatible with q {tuple(q.shape)}: need same B and D "
            "and kv heads dividing q heads"
        )
    tk = k.shape[2]
    if causal and tq != tk:
        raise ValueError(f"causal attention needs as many queries as keys, got Tq={tq}, Tk={tk}")
    if kv_doc_ids is not None and doc_ids is None:
        raise ValueError("kv_doc_ids given without doc_ids (the query side's ids)")
    if doc_ids is not None and tuple(doc_ids.shape) != (b, tq):
        raise ValueError(f"doc_ids must be (B, Tq) = {(b, tq)}, got {tuple(doc_ids.shape)}")
    kv = kv_doc_ids if kv_doc_ids is not None else doc_ids
    if kv is not None and tuple(kv.shape) != (b, tk):
        raise ValueError(f"kv_doc_ids must be (B, Tk) = {(b, tk)}, got {tuple(kv.shape)}")
    return hq // k.shape[1]


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def attention_forward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scale + mask) V and the row logsumexp, in fp32 (fp64 if given fp64).

    Args:
        q: (B, Hq, Tq, D).
        k: (B, Hkv, Tk, D), Hq % Hkv == 0.
        v: (B, Hkv, Tk, D).
        causal: mask keys after the query (Tq == Tk).
        softmax_scale: defaults to 1 / sqrt(D).
        doc_ids: (B, Tq) integer document ids of the queries, or None.
        kv_doc_ids: (B, Tk) document ids of the keys; defaults to ``doc_ids``.

    Returns:
        out (B, Hq, Tq, D) in q's dtype (differentiable), and lse (B, Hq, Tq) in the
        compute dtype: ``log sum_j exp(scale * q_i . k_j)`` over visible keys (natural
        log; -inf for a query that sees no key).
    """
    group = check_shapes(q, k, v, causal=causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids)
    compute = _compute_dtype(q)
    kf = k.to(compute).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    scores = q.to(compute) @ kf.transpose(-1, -2) * _scale(q, softmax_scale)  # (B, Hq, Tq, Tk)
    mask = attention_mask(
        q.shape[2], k.shape[2], causal=causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids, device=q.device
    )
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1).detach()
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:  # a row with no visible key gives zeros, never NaN
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return (probs @ vf).to(q.dtype), lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output of :func:`attention_forward_reference` (differentiable w.r.t. q, k, v)."""
    return attention_forward_reference(
        q, k, v, causal=causal, softmax_scale=softmax_scale, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids
    )[0]


def attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention given its output and logsumexp (Dao 2023, Alg. 2).

    ``P = exp(S - lse)`` (0 where masked), ``dV = P^T dO``, ``dP = dO V^T``,
    ``delta = rowsum(dO * O)``, ``dS = P * (dP - delta)``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``; dK and dV are summed over the query heads of each kv head.
    With the local (out, lse) this is autograd's answer; with the global (out, lse)
    of a larger attention it gives this K/V block's share of the global gradient.

    Args:
        grad_out: (B, Hq, Tq, D) gradient of the output.
        q, k, v: as in :func:`attention_forward_reference`.
        out: (B, Hq, Tq, D) attention output (local or global).
        lse: (B, Hq, Tq) natural-log logsumexp matching ``out``.
        causal, softmax_scale, doc_ids, kv_doc_ids: as in the forward.

    Returns:
        (dq, dk, dv) in q's, k's and v's dtypes.
    """
    group = check_shapes(q, k, v, causal=causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids)
    compute = _compute_dtype(q)
    scale = _scale(q, softmax_scale)
    b, hkv, tk, d = k.shape
    qf, dof = q.to(compute), grad_out.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, Hq, Tq, Tk)
    probs = torch.exp(scores - lse.to(compute)[..., None])
    mask = attention_mask(
        q.shape[2], tk, causal=causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids, device=q.device
    )
    if mask is not None:
        probs = torch.where(mask, probs, 0.0)
    delta = (dof * out.to(compute)).sum(-1, keepdim=True)  # (B, Hq, Tq, 1)
    dscores = probs * (dof @ vf.transpose(-1, -2) - delta)
    dq = dscores @ kf * scale
    dk = (dscores.transpose(-1, -2) @ qf * scale).view(b, hkv, group, tk, d).sum(2)
    dv = (probs.transpose(-1, -2) @ dof).view(b, hkv, group, tk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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
    """The ``impl="torch"`` path of ``flash_attention``: ``F.scaled_dot_product_attention``.

    Self-attention (queries and keys share ``doc_ids``, so every query sees at least
    itself); otherwise the arguments and result of :func:`attention_reference`.
    Without ``doc_ids`` it uses ``is_causal`` (flash / memory-efficient backends on
    CUDA); with ``doc_ids`` it passes an explicit (B, 1, Tq, Tk) boolean mask.
    """
    group = check_shapes(q, k, v, causal=causal, doc_ids=doc_ids)
    kwargs: dict = {}
    if group > 1:
        if _sdpa_has_gqa():
            kwargs["enable_gqa"] = True
        else:  # torch < 2.5: materialize the repeat
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, **kwargs)
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, doc_ids=doc_ids, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, **kwargs)
