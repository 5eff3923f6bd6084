"""Tensor-parallel collectives as small named autograd functions (after Megatron ``mappings.py``).

Each pair is conjugate: the backward of one is the forward of the other.

=========================  =============================  =============================
function                   forward                        backward
=========================  =============================  =============================
``copy_to_tp``             identity                       all-reduce
``reduce_from_tp``         all-reduce                     identity
``gather_from_tp``         all-gather, last dim           split, last dim
``gather_from_sp``         all-gather, sequence dim (1)   reduce-scatter, sequence dim
``reduce_scatter_to_sp``   reduce-scatter, sequence dim   all-gather, sequence dim
=========================  =============================  =============================

With ``group=None`` or a group of one rank every function is the identity, so a
TP=1 model runs the same code without communication. Every collective adds the
bytes one rank sends under a ring algorithm to :data:`COMM_BYTES` (keyed by
operation), so benchmarks can report bytes moved per step: all-reduce of ``S``
bytes ``2 (n-1)/n S``; all-gather or reduce-scatter of a full tensor of ``S`` bytes
``(n-1)/n S`` (Thakur et al. 2005; Korthikanti et al. 2022, section 4.2.2).

The collectives themselves are ``torch.library`` custom ops (``megalm::all_reduce``,
``all_gather``, ``reduce_scatter``, taking the group's name): ``torch.compile`` traces the
autograd pairs around them into the block's graph and keeps each collective as one opaque
node, so a compiled block has no graph break and the byte count runs at every call.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

COMM_BYTES: Counter[str] = Counter()


def tp_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def _count(op: str, full_bytes: int, n: int) -> None:
    """Record the bytes one rank sends for ``op`` over a full tensor of ``full_bytes``."""
    factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
    COMM_BYTES[op] += round(factor * full_bytes)


def _group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


# The collectives are torch.library custom ops: opaque nodes to torch.compile (one graph per
# block, no graph break), and COMM_BYTES counts every call at run time, compiled or not.
@torch.library.custom_op("megalm::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, group_name: str, op: str) -> torch.Tensor:
    group = _group(group_name)
    out = x.contiguous().clone()
    _count("all_reduce", out.numel() * out.element_size(), dist.get_world_size(group))
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out


@torch.library.custom_op("megalm::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    group = _group(group_name)
    n = dist.get_world_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    _count("all_gather", n * x.numel() * x.element_size(), n)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


@torch.library.custom_op("megalm::reduce_scatter", mutates_args=())
def _reduce_scatter_op(x: torch.Tensor, dim: int, group_name: str) -> torch.Tensor:
    group = _group(group_name)
    n = dist.get_world_size(group)
    _count("reduce_scatter", x.numel() * x.element_size(), n)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: reduce all, keep ours
        full = x.contiguous().clone()
        dist.all_reduce(full, group=group)
        return full.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()
    chunks = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


@_all_reduce_op.register_fake
def _(x, group_name, op):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_all_gather_op.register_fake
def _(x, dim, group_name):
    shape = list(x.shape)
    shape[dim] *= dist.get_world_size(_group(group_name))
    return x.new_empty(shape)


@_reduce_scatter_op.register_fake
def _(x, dim, group_name):
    shape = list(x.shape)
    shape[dim] //= dist.get_world_size(_group(group_name))
    return x.new_empty(shape)


def all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """All-reduce (``op`` "sum" or "max") into a new tensor, counted in :data:`COMM_BYTES`; no
    autograd: for statistics such as the cross entropy's row max and sum of exponentials."""
    return _all_reduce_op(x, group.group_name, op) if tp_size(group) > 1 else x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return all_reduce(x, group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _all_gather_op(x, dim % x.dim(), group.group_name) if tp_size(group) > 1 else x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = tp_size(group)
    if n == 1:
        return x
    if x.size(dim) % n:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by tp({n})")
    return x.chunk(n, dim=dim)[tp_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _reduce_scatter_op(x, dim % x.dim(), group.group_name) if tp_size(group) > 1 else x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, 1, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Forward identity, backward all-reduce: enter a TP region (or share a replicated weight)."""
    return _CopyToTP.apply(x, group) if tp_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Forward all-reduce (sum of partial results), backward identity."""
    return _ReduceFromTP.apply(x, group) if tp_size(group) > 1 else x


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """(..., n/tp) -> (..., n): forward all-gather of the last dim, backward split."""
    return _GatherFromTP.apply(x, group) if tp_size(group) > 1 else x


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, C) -> (B, T, C): forward all-gather, backward reduce-scatter."""
    return _GatherFromSP.apply(x, group) if tp_size(group) > 1 else x


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, C) partial sums -> (B, T/tp, C) reduced: forward reduce-scatter, backward all-gather."""
    return _ReduceScatterToSP.apply(x, group) if tp_size(group) > 1 else x
