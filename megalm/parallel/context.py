"""Context parallelism's sequence layout: which tokens of a sequence each cp rank holds.

A sequence of ``T`` tokens is cut into ``2 cp`` chunks of ``c = T / (2 cp)`` tokens;
cp rank ``i`` holds chunks ``i`` and ``2cp-1-i``, concatenated in that order (the
load-balanced layout of Megatron-core's ``get_batch_on_this_cp_rank`` and torchtitan's
``context_parallel``): under a causal mask the early chunk sees few keys and the late
one many, so every rank has the same attention work. For ``T = 8``, ``cp = 2``::

    positions   0 1 | 2 3 | 4 5 | 6 7
    rank 0      0 1               6 7
    rank 1            2 3   4 5

This module owns that rule: the loader cuts tokens, labels, position and document ids
with :func:`shard_sequence`, the model asks :func:`local_positions` for the global
positions of its tokens (RoPE, learned positions), ring attention
(``megalm/parallel/ring.py``) relies on the order (positions increase along a rank's
tokens), and :func:`gather_sequence` puts per-rank outputs back in sequence order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def cp_size(group) -> int:
    """Ranks in the cp ``group`` (1 for ``None``: no context parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def cp_rank(group) -> int:
    """This rank's index in the cp ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def chunk_positions(
    seq_len: int, cp: int, rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (``seq_len / cp``,) int64 of the tokens cp rank ``rank`` holds, in order.

    Raises:
        ValueError: ``seq_len`` is not a multiple of ``2 cp`` (the layout rule
            ``seq % 2cp`` of :func:`megalm.parallel.layout.layout_problems`).
    """
    if seq_len % (2 * cp):
        raise ValueError(f"sequence of {seq_len} tokens cannot be cut into 2 * cp = {2 * cp} equal chunks")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s tokens of ``x`` along ``dim``: (..., T, ...) -> (..., T / cp, ...), chunks
    ``rank`` and ``2cp-1-rank`` concatenated."""
    if cp == 1:
        return x
    index = chunk_positions(x.size(dim), cp, rank, x.device)
    return x.index_select(dim, index)


def local_positions(t_local: int, group, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (``t_local``,) of this rank's ``t_local`` tokens under the cp ``group``
    (``None``: no context parallelism, positions ``0 .. t_local - 1``)."""
    cp = cp_size(group)
    if cp == 1:
        return torch.arange(t_local, device=device)
    return chunk_positions(t_local * cp, cp, cp_rank(group), device)


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence` over the cp ``group``: every rank's (..., T / cp, ...)
    -> (..., T, ...) in sequence order, on every rank (all-gather; no autograd)."""
    cp = cp_size(group)
    if cp == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x, group=group)
    t = x.size(dim) * cp
    order = torch.cat([chunk_positions(t, cp, r, x.device) for r in range(cp)])  # position of each row
    stacked = torch.cat(parts, dim=dim)
    return stacked.index_select(dim, torch.argsort(order))
