"""Dropout that gives the same masks under any tensor/sequence-parallel layout.

Megatron keeps a second RNG stream per TP rank for sharded regions, so its TP=2
masks cannot equal the TP=1 masks. megalm instead draws every mask at its full,
unsharded shape from one seeded stream that all TP ranks advance identically, and
each rank keeps its slice:

- replicated activations (the residual stream without SP): every rank keeps the
  whole mask, so the masks are identical across TP ranks;
- sharded activations (the residual stream with SP, split over the sequence): each
  rank keeps its own slice, so masks differ across TP ranks;
- in both cases the union of the slices is exactly the TP=1 mask, so a TP=N run
  with dropout equals the TP=1 run with the same seed;
- context parallelism (``cp_group``): the mask is drawn for the whole sequence and
  each cp rank keeps its tokens' rows (:mod:`megalm.parallel.context`), so a CP=N
  run equals the CP=1 run too.

The cost is drawing the full mask on every rank (``B * T * C`` Bernoulli samples
per dropout site), which is small next to the layer's matmuls; under context
parallelism that full-sequence mask is also a transient ``cp`` times the size of
the rank's activation (dropout is usually 0 in long-context pretraining).
"""

from __future__ import annotations

import torch

from megalm.parallel.context import cp_rank, cp_size, shard_sequence
from megalm.parallel.mappings import tp_rank, tp_size


def dropout(x: torch.Tensor, p: float, training: bool, seq_group=None, cp_group=None) -> torch.Tensor:
    """Inverted dropout ``x * (m / (1 - p))``, ``m ~ Bernoulli(1 - p)`` drawn at full shape
    (the mask is scaled in place, so forward and backward are one multiplication each).

    Args:
        x: (B, T, C), or (B, T/tp, C) when ``seq_group`` is the TP group of a
            sequence-parallel region; ``T`` is this rank's ``seq_len / cp`` tokens
            under context parallelism.
        seq_group: the group over which dimension 1 of ``x`` is split (``None``: not split).
        cp_group: the context-parallel group (``None``: no context parallelism).
    """
    if not training or p == 0.0:
        return x
    tp, cp = tp_size(seq_group), cp_size(cp_group)
    full = (x.size(0), x.size(1) * tp * cp, *x.shape[2:])
    mask = torch.empty(full, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    mask = shard_sequence(mask, cp, cp_rank(cp_group))
    if tp > 1:
        mask = mask.chunk(tp, dim=1)[tp_rank(seq_group)]
    return x * mask.div_(1.0 - p)
