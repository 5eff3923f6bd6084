"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019, section 3).

Every layer takes its TP process group explicitly (``None`` = no parallelism) and
keeps only its shard. Sharded parameters carry ``tensor_model_parallel = True`` and
``partition_dim`` so DeepSpeed's gradient-norm code counts them once per shard.
Full tensors are initialized deterministically on every rank and sliced
(:meth:`shard`), so a TP=N model has exactly the weights of the TP=1 model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import use_triton
from kernels import vocab_parallel_cross_entropy as kernel_vp_ce
from megalm.parallel.mappings import (
    all_reduce,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    tp_rank,
    tp_size,
)


def _mark(p: nn.Parameter, dim: int, group) -> nn.Parameter:
    """Tag a parameter that is really split over a TP group of more than one rank."""
    if tp_size(group) > 1:
        p.tensor_model_parallel = True
        p.partition_dim = dim
    return p


def enter_tp(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Input of a column-parallel region: all-gather the sequence (SP) or identity/all-reduce-grad."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Output of a row-parallel region: reduce-scatter the sequence (SP) or all-reduce."""
    return reduce_scatter_to_sp(x, group) if sequence_parallel else reduce_from_tp(x, group)


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split by output rows (Megatron: columns of ``A^T``).

    ``A = [A_1; ...; A_p]``: rank ``i`` holds ``A_i`` (out/p, in) and ``b_i`` and computes
    ``Y_i = X A_i^T + b_i``. The caller enters the TP region once (:func:`enter_tp`)
    for all projections that share an input.

    Shapes: x (B, T, in) -> (B, T, out/p).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group=None) -> None:
        super().__init__()
        tp = tp_size(group)
        if out_features % tp:
            raise ValueError(f"output size {out_features} is not divisible by tp({tp})")
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.weight = _mark(nn.Parameter(torch.empty(out_features // tp, in_features)), 0, group)
        self.bias = _mark(nn.Parameter(torch.zeros(out_features // tp)), 0, group) if bias else None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (out, ...) tensor."""
        return full.chunk(tp_size(self.group), dim=0)[tp_rank(self.group)]

    def forward(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``rows``: use only the first ``rows`` output rows of this shard (the output head's
        real vocabulary, :func:`megalm.model.gpt.head_rows`); ``None``: all of them."""
        if rows is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias[:rows]
        return F.linear(x, self.weight[:rows], bias)


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split by input columns and ``X = [X_1, ..., X_p]``.

    Rank ``i`` computes ``X_i A_i^T``; the partial sums are all-reduced (or
    reduce-scattered over the sequence with SP) and the replicated bias is added.

    Shapes: x (B, T, in/p) -> (B, T, out), or (B, T/p, out) with sequence parallelism.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group=None, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        tp = tp_size(group)
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by tp({tp})")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = _mark(nn.Parameter(torch.empty(out_features, in_features // tp)), 1, group)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full (out, in) tensor."""
        return full.chunk(tp_size(self.group), dim=1)[tp_rank(self.group)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size(self.group) == 1:  # no partial sums: the bias rides in the matmul (addmm)
            return F.linear(x, self.weight, self.bias)
        y = exit_tp(F.linear(x, self.weight), self.group, self.sequence_parallel)
        if self.bias is None:
            return y
        # With SP each rank adds the bias to its own tokens only: sum its gradient over TP.
        bias = copy_to_tp(self.bias, self.group) if self.sequence_parallel else self.bias
        return y + bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split: rank ``i`` holds ``[start_i, end_i)``.

    Tokens outside the local range look up zeros; the partial embeddings are
    all-reduced (or reduce-scattered over the sequence with SP).

    Shapes: tokens (B, T) -> (B, T, C), or (B, T/p, C) with sequence parallelism.
    """

    def __init__(self, num_embeddings: int, dim: int, group=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = tp_size(group)
        if num_embeddings % tp:
            raise ValueError(f"vocabulary size {num_embeddings} is not divisible by tp({tp})")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings, self.dim = num_embeddings, dim
        per_rank = num_embeddings // tp
        self.vocab_start = tp_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = _mark(nn.Parameter(torch.empty(per_rank, dim)), 0, group)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.vocab_start : self.vocab_end]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tp_size(self.group) == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_tp(emb, self.group, self.sequence_parallel)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The PyTorch path of :func:`vocab_parallel_cross_entropy`: few passes over the logits.

    Forward (Megatron-LM ``_VocabParallelCrossEntropy``, with one all-reduce fewer): the row
    max ``M`` (one read of the slice, then a MAX all-reduce of N values), the shifted
    exponentials ``e = exp(z - M)`` (one write, exponentiated in place) and their row sum
    (one read), the target logit (N reads); one SUM all-reduce of the (2, N) stack
    ``[sum_v e, z_y]`` gives ``S`` and ``z_y``; ``loss = M + log S - z_y``.

    Backward: ``dz = g * (e / S - [v == y])``: one in-place scaling of the saved ``e`` and a
    scatter of ``-g`` into the N target columns; no collective. ``e`` (fp32) is kept instead
    of the logits (same size in fp32, twice the size of bf16 logits) and is consumed by the
    backward, so the graph can be differentiated once.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
        n, v_local = logits.shape
        stats = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        # (N,); -inf on a rank whose whole slice is vocabulary padding
        row_max = logits.amax(dim=-1).to(stats) if v_local else logits.new_full((n,), -torch.inf, dtype=stats)
        row_max = all_reduce(row_max, group, "max")
        shift = torch.where(torch.isneginf(row_max), 0.0, row_max)[:, None]  # (N, 1)
        exps = torch.sub(logits, shift).exp_()  # (N, V/p) in ``stats`` (type promotion)
        local = target - vocab_start
        inside = (local >= 0) & (local < v_local)
        local = local.clamp(0, max(v_local - 1, 0))[:, None]  # (N, 1)
        target_logit = logits.gather(1, local)[:, 0].to(stats) if v_local else row_max.new_zeros(n)
        sums = torch.stack([exps.sum(dim=-1), torch.where(inside, target_logit, 0.0)])  # (2, N)
        sums = all_reduce(sums, group)
        ctx.save_for_backward(exps, sums[0], local, inside)
        ctx.dtype = logits.dtype
        return shift[:, 0] + torch.log(sums[0]) - sums[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        exps, sum_exp, local, inside = ctx.saved_tensors
        grad_loss = grad_loss.to(exps.dtype)
        grad = exps.mul_((grad_loss / sum_exp)[:, None])  # softmax * g, in place
        if grad.shape[-1]:
            grad.scatter_add_(1, local, torch.where(inside, -grad_loss, 0.0)[:, None])
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group=None,
    vocab_start: int = 0,
    n_valid: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-token loss from this rank's logit columns ``[vocab_start, vocab_start + V/p)``.

    ``loss_n = log(sum_v exp(z_nv)) - z_{n,y_n}`` with the row max, the sum of
    exponentials and the target logit reduced over TP (Megatron ``cross_entropy.py``);
    full-vocabulary logits never exist on one rank, and the backward is local. Padded
    vocabulary columns (``>= n_valid``) never enter the softmax. The Triton path
    (:func:`kernels.vocab_parallel_cross_entropy`, chosen by :func:`kernels.use_triton`)
    streams the logits once each way; the PyTorch path is :class:`_VocabParallelCrossEntropy`
    (at tp = 1 about twice as fast on CPU as ``F.cross_entropy``'s log-softmax + NLL,
    ``launch/bench_hf.py``).

    Args:
        logits: (N, V/p) local logits. target: (N,) global token ids.
        n_valid: real vocabulary size (default: every column is real).
        impl: ``model.kernels`` (``auto`` | ``triton`` | ``torch``).

    Returns:
        (N,) fp32 losses (fp64 for fp64 logits), identical on every TP rank.
    """
    tp = tp_size(group)
    n_valid = n_valid if n_valid is not None else vocab_start + logits.size(-1) * tp
    local_valid = min(logits.size(-1), max(0, n_valid - vocab_start))
    if local_valid < logits.size(-1):
        logits = logits[:, :local_valid]
    if not use_triton(impl, logits, target, op="cross_entropy"):
        return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group)
    return kernel_vp_ce(
        logits,
        target,
        vocab_start=vocab_start,
        all_reduce_max=lambda t: all_reduce(t, group, "max"),
        all_reduce_sum=lambda t: all_reduce(t, group),
        impl=impl,
    )


def gather_logits(local: torch.Tensor, group, n_valid: int) -> torch.Tensor:
    """(..., V/p) local logits -> (..., n_valid) full logits without the padded columns."""
    return gather_from_tp(local, group)[..., :n_valid]
