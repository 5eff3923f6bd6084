"""Cross entropy: fused Triton kernels over a vocab slice, and the vocab-parallel loss.

Three layers, from plain to parallel:

* :func:`cross_entropy` - per-token loss over the full vocabulary.
* :func:`cross_entropy_partials` / :func:`cross_entropy_slice_grad` - the two
  primitives over a local vocab slice ``[vocab_start, vocab_start + V_local)``:
  per-row statistics to all-reduce, and the slice's gradient given the global
  logsumexp.
* :func:`vocab_parallel_cross_entropy` - the differentiable loss for a rank that
  holds a vocab slice, built from the primitives. The collectives are passed in
  as callables, so this package never touches ``torch.distributed``; with
  identity callables it equals :func:`cross_entropy`.

Reduction (Megatron-LM ``_VocabParallelCrossEntropy``; one MAX then one SUM of a
(3, N) tensor)::

    M   = all_reduce_max(row_max)
    S   = all_reduce_sum(sum_exp * exp(row_max - M)),  lse = M + log S
    x_y = all_reduce_sum(target_logit),  Z = all_reduce_sum(sum_logits)
    loss = lse - (1 - eps) * x_y - (eps / V) * Z        (0 where label == ignore_index)

The backward needs no collective: each rank writes its own slice's gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.cross_entropy.reference import (
    CrossEntropyPartials,
    cross_entropy_reference,
    partials_reference,
    slice_grad_reference,
)
from kernels.dispatch import device_guard, use_triton

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
    return use_triton(impl, logits, labels) and logits.dtype in _TRITON_DTYPES


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


@torch.no_grad()
def cross_entropy_partials(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int = 0,
    ignore_index: int = -100,
    impl: str = "auto",
) -> CrossEntropyPartials:
    """Per-row statistics of a vocab slice, to be reduced across the vocab-parallel group.

    Args:
        logits: (N, V_local) logits of columns ``[vocab_start, vocab_start + V_local)``.
        labels: (N,) global class ids (or ``ignore_index``).
        vocab_start: global id of the slice's first column.
        ignore_index: label value of ignored rows (their target_logit is 0).
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        :class:`CrossEntropyPartials` of (N,) fp32 tensors: row_max (reduce with MAX),
        sum_exp relative to row_max (rescale by exp(row_max - global_max), then SUM),
        target_logit and sum_logits (SUM). Not differentiable: use
        :func:`vocab_parallel_cross_entropy` for the loss with gradients.
    """
    _check(logits, labels)
    if _triton(impl, logits, labels):
        from kernels.cross_entropy.kernel import partials_triton

        with device_guard(logits):
            return partials_triton(logits, labels, vocab_start=vocab_start, ignore_index=ignore_index)
    return partials_reference(logits, labels, vocab_start=vocab_start, ignore_index=ignore_index)


@torch.no_grad()
def cross_entropy_slice_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Gradient of the per-token loss w.r.t. one vocab slice of the logits.

    ``dlogits_j = grad_loss * (exp(x_j - lse) - (1 - eps) [j == y] - eps / V)``, zero
    on ignored rows; only the (N, V_local) slice is ever materialized.

    Args:
        logits: (N, V_local) slice of columns ``[vocab_start, vocab_start + V_local)``.
        labels: (N,) global class ids.
        lse: (N,) fp32 global logsumexp (natural log) of each row over the full vocab.
        grad_loss: (N,) upstream gradient of the per-token loss.
        vocab_start: global id of the slice's first column.
        vocab_size: V, the full vocabulary size (for label smoothing).
        ignore_index: label value of ignored rows.
        label_smoothing: eps.
        impl: "auto" | "triton" | "torch".

    Returns:
        (N, V_local) gradient in the logits' dtype.
    """
    _check(logits, labels)
    kwargs = dict(
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    if _triton(impl, logits, labels):
        from kernels.cross_entropy.kernel import slice_grad_triton

        with device_guard(logits):
            return slice_grad_triton(logits, labels, lse, grad_loss, **kwargs)
    return slice_grad_reference(logits, labels, lse, grad_loss, **kwargs)


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
        vocab_size: int,
        all_reduce_max: Collective,
        all_reduce_sum: Collective,
        ignore_index: int,
        label_smoothing: float,
        impl: str,
    ) -> torch.Tensor:
        part = cross_entropy_partials(
            logits, labels, vocab_start=vocab_start, ignore_index=ignore_index, impl=impl
        )
        global_max = all_reduce_max(part.row_max.clone())
        shift = torch.where(torch.isneginf(global_max), 0.0, global_max)
        local_sum = part.sum_exp * torch.exp(part.row_max - shift)
        local_sum = torch.where(torch.isneginf(part.row_max), 0.0, local_sum)
        sums = all_reduce_sum(torch.stack([local_sum, part.target_logit, part.sum_logits]))
        lse = shift + torch.log(sums[0])
        loss = lse - (1.0 - label_smoothing) * sums[1] - (label_smoothing / vocab_size) * sums[2]
        loss = torch.where(labels == ignore_index, 0.0, loss)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (vocab_start, vocab_size, ignore_index, label_smoothing, impl)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        vocab_start, vocab_size, ignore_index, label_smoothing, impl = ctx.args
        dlogits = cross_entropy_slice_grad(
            logits, labels, lse, grad_loss, vocab_start=vocab_start, vocab_size=vocab_size,
            ignore_index=ignore_index, label_smoothing=label_smoothing, impl=impl,
        )  # fmt: skip
        return dlogits, None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    all_reduce_max: Collective = _identity,
    all_reduce_sum: Collective = _identity,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token cross entropy when this rank holds a slice of the vocabulary.

    Args:
        logits: (N, V_local) logits of columns ``[vocab_start, vocab_start + V_local)``.
        labels: (N,) global class ids (same on every rank of the group).
        vocab_start: global id of this slice's first column.
        vocab_size: V, the full vocabulary size.
        all_reduce_max: in-place-or-not MAX all-reduce over the vocab-parallel group
            returning the reduced tensor, e.g.
            ``lambda t: (dist.all_reduce(t, dist.ReduceOp.MAX, group=tp_group), t)[1]``.
        all_reduce_sum: the same with SUM (called once, on a (3, N) fp32 tensor).
        ignore_index: label value whose rows get loss 0 and no gradient.
        label_smoothing: eps in [0, 1].
        impl: "auto" | "triton" | "torch".

    Returns:
        (N,) fp32 per-token loss, identical on every rank; differentiable w.r.t.
        ``logits`` (backward is local, no collective).
    """
    _check(logits, labels)
    return VocabParallelCrossEntropyFunction.apply(
        logits, labels, vocab_start, vocab_size, all_reduce_max, all_reduce_sum,
        ignore_index, label_smoothing, impl,
    )  # fmt: skip


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token cross entropy (reduction "none") with ignore index and label smoothing.

    ``loss = lse - (1 - eps) x_y - (eps / V) sum_j x_j`` (PyTorch's convention).

    Args:
        logits: (..., V) logits, any float dtype.
        labels: (...) integer class ids in [0, V) or ``ignore_index`` (not range-checked
            on the Triton path: an out-of-range label contributes target logit 0).
        ignore_index: label value whose rows get loss 0 and no gradient.
        label_smoothing: eps in [0, 1].
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
        loss = cross_entropy_reference(
            flat_logits, flat_labels, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        return loss.view(labels.shape)
    loss = vocab_parallel_cross_entropy(
        flat_logits, flat_labels, vocab_start=0, vocab_size=logits.shape[-1],
        ignore_index=ignore_index, label_smoothing=label_smoothing, impl=impl,
    )  # fmt: skip
    return loss.view(labels.shape)
