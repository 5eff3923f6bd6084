"""Attention: FlashAttention-2 in Triton (custom ops), with SDPA / plain-math fallbacks.

* :func:`flash_attention` - differentiable attention, the model's hot path.
* :func:`attention_forward` / :func:`attention_backward` - the two halves as plain
  (non-autograd) functions returning and taking the logsumexp, for ring attention
  (context parallelism): partial outputs of K/V blocks combine through their
  logsumexp, and each block's gradient follows from the *global* output and
  logsumexp (``delta = rowsum(dO * O)``).
* :func:`unfused_attention` (``unfused.py``) - Q K^T, the fused scale-mask-softmax
  kernel, then ``P V``: arbitrary masks and KV-cache decode rows.
"""

from __future__ import annotations

import torch

from kernels.attention.ops import attention_bwd, attention_fwd
from kernels.attention.reference import (
    attention_backward_reference,
    attention_forward_reference,
    attention_reference,
    attention_sdpa,
    check_shapes,
)
from kernels.attention.unfused import unfused_attention
from kernels.dispatch import use_triton

__all__ = [
    "attention_backward",
    "attention_backward_reference",
    "attention_forward",
    "attention_forward_reference",
    "attention_reference",
    "attention_sdpa",
    "flash_attention",
    "triton_supports",
    "unfused_attention",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these inputs (else the public functions fall back).

    Head dim a multiple of 16 in [16, 128]; fp16, bf16 or fp32; q, k, v of one dtype.
    """
    d = q.shape[-1]
    return d % 16 == 0 and 16 <= d <= 128 and q.dtype in _TRITON_DTYPES and q.dtype == k.dtype == v.dtype


def _scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    return float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5


def _triton(impl: str, q, k, v, doc_ids, kv_doc_ids) -> bool:
    return use_triton(impl, q, k, v, doc_ids, kv_doc_ids, op="attention") and triton_supports(q, k, v)


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
        k: (B, Hkv, T, D), Hq % Hkv == 0 (grouped-query attention; query head h
            reads kv head h // (Hq // Hkv); K/V are never repeated in memory).
        v: (B, Hkv, T, D).
        causal: query i sees keys j <= i (top-left aligned).
        softmax_scale: defaults to 1 / sqrt(D).
        doc_ids: (B, T) integer document ids for packed sequences, or None; query i
            sees key j only when both carry the same id.
        impl: "auto" (Triton on CUDA where it passed its self-test, SDPA elsewhere),
            "triton" or "torch" (SDPA); see kernels/dispatch.py. Inputs the kernels do
            not support (head dim not a multiple of 16 or above 128, fp64) take the
            SDPA path even with "triton".

    Returns:
        (B, Hq, T, D) in q's dtype; differentiable w.r.t. q, k and v.
    """
    check_shapes(q, k, v, causal=causal, doc_ids=doc_ids)
    if not _triton(impl, q, k, v, doc_ids, None):
        return attention_sdpa(q, k, v, causal=causal, softmax_scale=softmax_scale, doc_ids=doc_ids)
    return attention_fwd(q, k, v, doc_ids, None, causal, _scale(q, softmax_scale))[0]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float | None = None,
    *,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and row logsumexp (not recorded by autograd).

    Args:
        q: (B, Hq, Tq, D).
        k, v: (B, Hkv, Tk, D), Hq % Hkv == 0; Tk may differ from Tq when not causal.
        causal: top-left causal mask (needs Tq == Tk).
        sm_scale: softmax scale, default 1 / sqrt(D).
        doc_ids: (B, Tq) document ids of the queries, or None.
        kv_doc_ids: (B, Tk) document ids of the keys; defaults to ``doc_ids``.
        impl: "auto" | "triton" | "torch" (torch: :func:`attention_forward_reference`).

    Returns:
        out (B, Hq, Tq, D) in q's dtype and lse (B, Hq, Tq) fp32, natural log
        (``log sum_j exp(sm_scale * q_i . k_j)`` over visible keys; -inf where a
        query sees no key, so it adds nothing when combined).
    """
    check_shapes(q, k, v, causal=causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids)
    with torch.no_grad():
        if _triton(impl, q, k, v, doc_ids, kv_doc_ids):
            return attention_fwd(q, k, v, doc_ids, kv_doc_ids, causal, _scale(q, sm_scale))
        out, lse = attention_forward_reference(
            q, k, v, causal=causal, softmax_scale=sm_scale, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids
        )
    return out, lse.float()


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float | None = None,
    *,
    doc_ids: torch.Tensor | None = None,
    kv_doc_ids: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of attention given its output ``o`` and logsumexp ``lse``.

    ``o`` and ``lse`` may be the global output and logsumexp of a larger attention
    of which (k, v) is one block (ring attention): the result is then this block's
    share, dq summing over blocks and dk/dv belonging to the block. Not recorded
    by autograd.

    Args:
        do: (B, Hq, Tq, D) gradient of the output.
        q, k, v, causal, sm_scale, doc_ids, kv_doc_ids, impl: as in :func:`attention_forward`.
        o: (B, Hq, Tq, D) output; lse: (B, Hq, Tq) natural-log logsumexp.

    Returns:
        (dq, dk, dv) shaped and typed like q, k, v.
    """
    check_shapes(q, k, v, causal=causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids)
    if do.shape != q.shape or o.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(
            f"do {tuple(do.shape)} and o {tuple(o.shape)} must be q's shape {tuple(q.shape)}, "
            f"lse {tuple(lse.shape)} must be {tuple(q.shape[:3])}"
        )
    with torch.no_grad():
        if _triton(impl, q, k, v, doc_ids, kv_doc_ids):
            return attention_bwd(do, q, k, v, o, lse, doc_ids, kv_doc_ids, causal, _scale(q, sm_scale), None)
        return attention_backward_reference(
            do, q, k, v, o, lse, causal=causal, softmax_scale=sm_scale, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids
        )
