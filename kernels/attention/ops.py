"""Flash attention as ``torch.library`` custom ops (opaque to ``torch.compile``).

``megalm::attention_fwd`` returns (out, lse); ``megalm::attention_bwd`` takes
(out, lse) as inputs, so it serves both the op's own autograd
(``register_autograd``) and callers that pass a global out/lse (ring attention).
"""

from __future__ import annotations

import torch

from kernels.dispatch import device_guard


@torch.library.custom_op("megalm::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor | None,
    kv_doc_ids: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Tq, D), lse (B, Hq, Tq) fp32 natural log); see function.attention_fwd_launch."""
    from kernels.attention.function import attention_fwd_launch

    with device_guard(q):
        return attention_fwd_launch(q, k, v, doc_ids, kv_doc_ids, causal, softmax_scale)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, doc_ids, kv_doc_ids, causal, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("megalm::attention_bwd", mutates_args=())
def attention_bwd(
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
    grad_lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given out and lse (local or global); see function.attention_bwd_launch."""
    from kernels.attention.function import attention_bwd_launch

    with device_guard(q):
        return attention_bwd_launch(
            grad_out, q, k, v, out, lse, doc_ids, kv_doc_ids, causal, softmax_scale, grad_lse
        )


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, doc_ids, kv_doc_ids, causal, softmax_scale, grad_lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc_ids, kv_doc_ids, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids, kv_doc_ids)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, doc_ids, kv_doc_ids = ctx.saved_tensors
    dq, dk, dv = attention_bwd(
        grad_out, q, k, v, out, lse, doc_ids, kv_doc_ids, ctx.causal, ctx.softmax_scale, grad_lse
    )
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
