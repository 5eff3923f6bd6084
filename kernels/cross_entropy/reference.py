"""Plain PyTorch cross entropy and its vocab-slice pieces: definition of correct, CPU path.

Per-token loss over a vocabulary of size V:

    loss = lse - x_y,     lse = log sum_j exp(x_j)

with gradient ``dloss/dx_j = softmax(x)_j - [j == y]``.

Vocab parallelism (Megatron-LM ``vocab_parallel_cross_entropy``): a rank holding
columns ``[start, end)`` computes per-row partials on its slice, the caller
reduces them across ranks (max, then sums), and the loss follows from the
totals. The gradient of each slice needs only the global ``lse`` and the slice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class CrossEntropyPartials(NamedTuple):
    """Per-row statistics of one vocab slice, all (N,) fp32.

    Attributes:
        row_max: max_j x_j over the slice (-inf for an empty slice).
        sum_exp: sum_j exp(x_j - row_max) over the slice.
        target_logit: x_y when the label falls in the slice, else 0.
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    target_logit: torch.Tensor


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(reduction="none")`` on fp32 logits (fp64 kept as fp64).

    Args:
        logits: (N, V).
        labels: (N,) integer class ids in [0, V).

    Returns:
        (N,) fp32 (fp64 for fp64 logits) per-token loss.
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(compute), labels.long(), reduction="none")


def partials_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int
) -> CrossEntropyPartials:
    """The statistics of :class:`CrossEntropyPartials` for the slice ``logits`` (N, V_local)."""
    x = logits.float()
    if x.shape[-1] == 0:
        row_max = x.new_full(x.shape[:1], -torch.inf)
        return CrossEntropyPartials(row_max, torch.zeros_like(row_max), torch.zeros_like(row_max))
    row_max = x.max(dim=-1).values
    shift = torch.where(torch.isneginf(row_max), 0.0, row_max)
    sum_exp = torch.exp(x - shift[:, None]).sum(dim=-1)
    local = labels.long() - vocab_start
    in_slice = (local >= 0) & (local < x.shape[-1])
    gathered = x.gather(-1, local.clamp(0, x.shape[-1] - 1)[:, None])[:, 0]
    return CrossEntropyPartials(row_max, sum_exp, torch.where(in_slice, gathered, 0.0))


def slice_grad_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    vocab_start: int,
) -> torch.Tensor:
    """dloss/dlogits for one slice: ``g * (exp(x - lse) - [j == y])``.

    Materializes only the local (N, V_local) slice, in three passes over it (exp,
    scale, cast) and a scatter of one entry per row; no one-hot matrix and no
    host synchronisation (rows whose label is outside the slice scatter 0).
    """
    grad = torch.exp(logits.float() - lse[:, None])  # (N, V_local) fp32
    if grad.shape[-1] == 0:  # a rank whose slice is all padding
        return grad.to(logits.dtype)
    local = labels.long() - vocab_start
    in_slice = (local >= 0) & (local < grad.shape[-1])
    minus_one = torch.where(in_slice, -1.0, 0.0).to(grad.dtype)
    grad.scatter_add_(1, local.clamp(0, grad.shape[-1] - 1)[:, None], minus_one[:, None])
    grad.mul_(grad_loss.float()[:, None])
    return grad.to(logits.dtype)
