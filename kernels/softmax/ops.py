"""The scale-mask-softmax kernels as ``torch.library`` custom ops (opaque to ``torch.compile``).

``megalm::softmax_fwd`` is differentiable through ``megalm::softmax_bwd``
(``register_autograd``; only the output probabilities are saved, as in
Megatron's fused kernel).
"""

from __future__ import annotations

import torch

from kernels.dispatch import device_guard


@torch.library.custom_op("megalm::softmax_fwd", mutates_args=())
def softmax_fwd(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool, q_offset: int
) -> torch.Tensor:
    """softmax(scale * scores, masked) over the last dim; see function.softmax_forward."""
    from kernels.softmax.function import softmax_forward

    with device_guard(scores):
        return softmax_forward(scores, scale=scale, mask=mask, causal=causal, q_offset=q_offset)


@softmax_fwd.register_fake
def _softmax_fwd_fake(scores, mask, scale, causal, q_offset):
    return scores.new_empty(scores.shape)


@torch.library.custom_op("megalm::softmax_bwd", mutates_args=())
def softmax_bwd(y: torch.Tensor, grad_y: torch.Tensor, scale: float) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y)) over the last dim."""
    from kernels.softmax.function import softmax_backward

    with device_guard(y):
        return softmax_backward(y, grad_y, scale=scale)


@softmax_bwd.register_fake
def _softmax_bwd_fake(y, grad_y, scale):
    return y.new_empty(y.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)
    ctx.scale = inputs[2]


def _backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return softmax_bwd(y, grad_y, ctx.scale), None, None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)
