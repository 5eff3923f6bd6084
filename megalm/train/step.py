"""One optimizer step through the DeepSpeed engine (pp = 1), with a timing hook."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch


class PhaseTimer(Protocol):
    """Timing hook: ``with timer.phase("forward"): ...`` (``megalm.perf`` implements it)."""

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...


class NoTimer:
    """The default hook: times nothing."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


def grad_norm(params, mpu=None) -> torch.Tensor:
    """Global L2 norm of the gradients of a model split over TP (DeepSpeed's convention), as a
    0-d fp32 tensor on the gradients' device (no host read).

    A parameter counts where it is model-parallel (``tensor_model_parallel``: a TP shard;
    ``model_parallel``: set by :func:`megalm.train.pipeline.mark_for_grad_norm` on the one
    TP rank of each pipeline stage that counts the stage's replicated tensors) and on
    model-parallel rank 0; the squares are summed over the model-parallel group (tp, or
    pipe x tensor under PP). This is DeepSpeed's rule (``is_model_parallel_parameter``).
    """
    grads = [
        p.grad.detach()
        for p in params
        if p.grad is not None
        and (
            mpu is None
            or getattr(p, "tensor_model_parallel", False)
            or getattr(p, "model_parallel", False)
            or mpu.get_model_parallel_rank() == 0
        )
    ]
    if grads:
        sq = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
    else:
        sq = torch.zeros((), dtype=torch.float64)
    if mpu is not None and mpu.get_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sq, group=mpu.get_model_parallel_group())
    return sq.sqrt().float()


def engine_step(
    engine,
    micro_batches,
    device: torch.device,
    measure_grad_norm: bool,
    mpu=None,
    timer: PhaseTimer | None = None,
    before_step: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
):
    """Forward/backward every micro-batch, stepping the engine after each.

    DeepSpeed scales each micro-batch loss by ``1 / accumulation`` and applies the
    optimizer at the accumulation boundary (the last micro-batch).

    Args:
        micro_batches: ``accum`` tuples (tokens, labels[, position_ids, doc_ids]), each
            (micro_batch, T); the ids reach the model's forward after the labels.
        measure_grad_norm: compute the global gradient norm before the step. Needed
            for ZeRO-0 fp32, where DeepSpeed clips but does not keep the norm.
        mpu: the model-parallel unit handed to DeepSpeed (for the norm across TP).
        timer: :class:`megalm.train.strategy.PhaseTimer`; gets ``forward``, ``backward``
            and ``optimizer`` phases.
        before_step: called after the last backward and before the engine's optimizer
            step with (this rank's mean micro-batch loss, grad norm or ``None``): where
            :class:`megalm.train.health.Health` gets what it checks.

    Returns:
        (this rank's mean micro-batch loss, grad norm or ``None``), 0-d tensors on ``device``.
    """
    losses, gnorm, timer = [], None, timer or NoTimer()
    for i, batch in enumerate(micro_batches):
        x, y, *ids = (t.to(device, non_blocking=True) for t in batch)
        with timer.phase("forward"):
            loss = engine(x, y, *ids)
        with timer.phase("backward"):
            engine.backward(loss)
        losses.append(loss.detach())
        if i == len(micro_batches) - 1:
            if measure_grad_norm:
                gnorm = grad_norm(engine.module.parameters(), mpu)
            if before_step is not None:
                before_step(torch.stack(losses).mean(), gnorm)
        with timer.phase("optimizer"):
            engine.step()
    if gnorm is None and engine.get_global_grad_norm() is not None:
        gnorm = torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float32)
    return torch.stack(losses).mean(), gnorm
