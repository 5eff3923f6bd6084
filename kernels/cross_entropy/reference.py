"""Plain PyTorch cross entropy and its vocab-slice pieces: definition of correct, CPU path.

Per-token loss with label smoothing ``eps`` over a vocabulary of size V
(Szegedy et al. 2016, sec. 7; PyTorch's ``F.cross_entropy`` convention):

    loss = (1 - eps) * (lse - x_y) + eps * (lse - mean_j x_j)
         = lse - (1 - eps) * x_y - (eps / V) * sum_j x_j,     lse = log sum_j exp(x_j)

Rows whose label is ``ignore_index`` have loss 0 and gradient 0. The gradient is

    dloss/dx_j = softmax(x)_j - (1 - eps) * [j == y] - eps / V.

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
        sum_logits: sum_j x_j over the slice (for label smoothing).
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    target_logit: torch.Tensor
    sum_logits: torch.Tensor


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy(reduction="none")`` on fp32 logits (fp64 kept as fp64).

    Args:
        logits: (N, V).
        labels: (N,) integer class ids or ``ignore_index``.
        ignore_index: label value whose rows get loss 0.
        label_smoothing: eps in [0, 1].

    Returns:
        (N,) fp32 (fp64 for fp64 logits) per-token loss.
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(
        logits.to(compute),
        labels.long(),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
    )


def partials_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int, ignore_index: int
) -> CrossEntropyPartials:
    """The statistics of :class:`CrossEntropyPartials` for the slice ``logits`` (N, V_local)."""
    x = logits.float()
    row_max = x.max(dim=-1).values if x.shape[-1] > 0 else x.new_full(x.shape[:1], -torch.inf)
    shift = torch.where(torch.isinf(row_max) & (row_max < 0), 0.0, row_max)
    sum_exp = torch.exp(x - shift[:, None]).sum(dim=-1)
    local = labels.long() - vocab_start
    in_slice = (local >= 0) & (local < x.shape[-1]) & (labels != ignore_index)
    if x.shape[-1] == 0:
        return CrossEntropyPartials(row_max, sum_exp, torch.zeros_like(row_max), sum_exp.clone())
    gathered = x.gather(-1, local.clamp(0, x.shape[-1] - 1)[:, None])[:, 0]
    target = torch.where(in_slice, gathered, 0.0)
    return CrossEntropyPartials(row_max, sum_exp, target, x.sum(dim=-1))


def slice_grad_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """dloss/dlogits for one slice: ``g * (exp(x - lse) - (1-eps)[j == y] - eps/V)``.

    Materializes only the local (N, V_local) slice.
    """
    x = logits.float()
    local = labels.long() - vocab_start
    cols = torch.arange(x.shape[-1], device=x.device)
    onehot = (cols[None, :] == local[:, None]).float()
    grad = torch.exp(x - lse[:, None]) - (1.0 - label_smoothing) * onehot
    grad = grad - label_smoothing / vocab_size
    g = torch.where(labels == ignore_index, 0.0, grad_loss.float())
    return (grad * g[:, None]).to(logits.dtype)
