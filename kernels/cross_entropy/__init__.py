"""Cross entropy: fused Triton kernels over a vocab slice, and the vocab-parallel loss.

Three layers, from plain to parallel:

* :func:`cross_entropy` - per-token loss over the full vocabulary.
* :func:`cross_entropy_partials` / :func:`cross_entropy_slice_grad` - the two
  primitives over a local vocab slice ``[vocab_start, vocab_start + V_local)``:
  per-row statistics to all-reduce, and the slice's gradient given the global
  logsumexp (custom ops ``megalm::cross_entropy_*`` on the Triton path).
* :func:`vocab_parallel_cross_entropy` - the differentiable loss for a rank that
  holds a vocab slice, built from the primitives. The collectives are passed in
  as callables, so this package never touches ``torch.distributed``; with
  identity callables it equals :func:`cross_entropy`.

Reduction (Megatron-LM ``_VocabParallelCrossEntropy``; one MAX then one SUM of a
(2, N) tensor)::

    M   = all_reduce_max(row_max)
    S   = all_reduce_sum(sum_exp * exp(row_max - M)),  lse = M + log S
    x_y = all_reduce_sum(target_logit)
    loss = lse - x_y

The backward needs no collective: each rank writes its own slice's gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.cross_entropy.ops import cross_entropy_partials_op, cross_entropy_slice_grad_op
from kernels.cross_entropy.reference import (
    CrossEntropyPartials,
    cross_entropy_reference,
    partials_reference,
    slice_grad_reference,
)
from kernels.dispatch import use_triton

__all__ = [
    "CrossEntropyPartials",
    "cross_entropy",
    "cross_entropy_partials",
    "cross_entropy_reference",
    "cross_entropy_slice_grad",
    "vocab_parallel_cross_entropy",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
Collective = Callable[[torch.Tensor], torch.Tensor]


def _triton(impl: str, logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return use_triton(impl, logits, labels, op="cross_entropy") and logits.dtype in _TRITON_DTYPES


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


@torch.no_grad()
def cross_entropy_partials(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int = 0, impl: str = "auto"
) -> CrossEntropyPartials:
    """Per-row statistics of a vocab slice, to be reduced across the vocab-parallel group.

    Args:
        logits: (N, V_local) logits of columns ``[vocab_start, vocab_start + V_local)``.
        labels: (N,) global class ids.
        vocab_start: global id of the slice's first column.
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        :class:`CrossEntropyPartials` of (N,) fp32 tensors: row_max (reduce with MAX),
        sum_exp relative to row_max (rescale by exp(row_max - global_max), then SUM),
        target_logit (SUM). Not differentiable: use :func:`vocab_parallel_cross_entropy`
        for the loss with gradients.
    """
    _check(logits, labels)
    if _triton(impl, logits, labels):
        return CrossEntropyPartials(*cross_entropy_partials_op(logits, labels, vocab_start))
    return partials_reference(logits, labels, vocab_start=vocab_start)


@torch.no_grad()
def cross_entropy_slice_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    vocab_start: int,
    impl: str = "auto",
) -> torch.Tensor:
    """Gradient of the per-token loss w.r.t. one vocab slice of the logits.

    ``dlogits_j = grad_loss * (exp(x_j - lse) - [j == y])``; only the (N, V_local)
    slice is ever materialized.

    Args:
        logits: (N, V_local) slice of columns ``[vocab_start, vocab_start + V_local)``.
        labels: (N,) global class ids.
        lse: (N,) fp32 global logsumexp (natural log) of each row over the full vocab.
        grad_loss: (N,) upstream gradient of the per-token loss.
        vocab_start: global id of the slice's first column.
        impl: "auto" | "triton" | "torch".

    Returns:
        (N, V_local) gradient in the logits' dtype.
    """
    _check(logits, labels)
    if _triton(impl, logits, labels):
        return cross_entropy_slice_grad_op(logits, labels, lse, grad_loss, vocab_start)
    return slice_grad_reference(logits, labels, lse, grad_loss, vocab_start=vocab_start)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Loss from slice partials and caller-supplied collectives; local-only backward."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_start: int,
        all_reduce_max: Collective,
        all_reduce_sum: Collective,
        impl: str,
    ) -> torch.Tensor:
        part = cross_entropy_partials(logits, labels, vocab_start=vocab_start, impl=impl)
        global_max = all_reduce_max(part.row_max.clone())
        shift = torch.where(torch.isneginf(global_max), 0.0, global_max)
        local_sum = part.sum_exp * torch.exp(part.row_max - shift)
        local_sum = torch.where(torch.isneginf(part.row_max), 0.0, local_sum)
        sums = all_reduce_sum(torch.stack([local_sum, part.target_logit]))
        lse = shift + torch.log(sums[0])
        ctx.save_for_backward(logits, labels, lse)
        ctx.vocab_start, ctx.impl = vocab_start, impl
        return lse - sums[1]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        dlogits = cross_entropy_slice_grad(
            logits, labels, lse, grad_loss, vocab_start=ctx.vocab_start, impl=ctx.impl
        )
        return dlogits, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    all_reduce_max: Collective = _identity,
    all_reduce_sum: Collective = _identity,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token cross entropy when this rank holds a slice of the vocabulary.

    Args:
        logits: (N, V_local) logits of columns ``[vocab_start, vocab_start + V_local)``.
        labels: (N,) global class ids (same on every rank of the group).
        vocab_start: global id of this slice's first column.
        all_reduce_max: in-place-or-not MAX all-reduce over the vocab-parallel group
            returning the reduced tensor, e.g.
            ``lambda t: (dist.all_reduce(t, dist.ReduceOp.MAX, group=tp_group), t)[1]``.
        all_reduce_sum: the same with SUM (called once, on a (2, N) fp32 tensor).
        impl: "auto" | "triton" | "torch".

    Returns:
        (N,) fp32 per-token loss, identical on every rank; differentiable w.r.t.
        ``logits`` (backward is local, no collective).
    """
    _check(logits, labels)
    return VocabParallelCrossEntropyFunction.apply(
        logits, labels, vocab_start, all_reduce_max, all_reduce_sum, impl
    )


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Per-token cross entropy (reduction "none"): ``loss = logsumexp(x) - x_y``.

    Args:
        logits: (..., V) logits, any float dtype.
        labels: (...) integer class ids in [0, V) (not range-checked on the Triton
            path: an out-of-range label contributes target logit 0).
        impl: "auto" | "triton" | "torch" (torch = ``F.cross_entropy`` on fp32 logits).

    Returns:
        (...) fp32 loss (fp64 for fp64 logits on the torch path); differentiable w.r.t.
        ``logits``.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be logits {tuple(logits.shape)}[:-1]")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if not _triton(impl, flat_logits, flat_labels):
        return cross_entropy_reference(flat_logits, flat_labels).view(labels.shape)
    loss = vocab_parallel_cross_entropy(flat_logits, flat_labels, vocab_start=0, impl=impl)
    return loss.view(labels.shape)
