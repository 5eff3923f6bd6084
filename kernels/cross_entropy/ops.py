"""The cross-entropy kernels as ``torch.library`` custom ops (opaque to ``torch.compile``).

Both are non-differentiable primitives; :class:`kernels.cross_entropy.VocabParallelCrossEntropyFunction`
composes them (with the caller's collectives in between) into a differentiable loss.
"""

from __future__ import annotations

import torch

from kernels.dispatch import device_guard


@torch.library.custom_op("megalm::cross_entropy_partials", mutates_args=())
def cross_entropy_partials_op(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_max, sum_exp, target_logit) of a vocab slice; see function.partials_forward."""
    from kernels.cross_entropy.function import partials_forward

    with device_guard(logits):
        return partials_forward(logits, labels, vocab_start)


@cross_entropy_partials_op.register_fake
def _partials_fake(logits, labels, vocab_start):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("megalm::cross_entropy_slice_grad", mutates_args=())
def cross_entropy_slice_grad_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, vocab_start: int
) -> torch.Tensor:
    """dloss/dlogits of a vocab slice; see function.slice_grad_forward."""
    from kernels.cross_entropy.function import slice_grad_forward

    with device_guard(logits):
        return slice_grad_forward(logits, labels, lse, grad_loss, vocab_start)


@cross_entropy_slice_grad_op.register_fake
def _slice_grad_fake(logits, labels, lse, grad_loss, vocab_start):
    return logits.new_empty(logits.shape)
