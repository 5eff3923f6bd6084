"""One optimizer step through the DeepSpeed engine (shared by the trainer and the benchmark)."""

from __future__ import annotations

import torch


def grad_norm(params, mpu=None) -> float:
    """Global L2 norm of the gradients of a model split over TP (DeepSpeed's convention):
    TP-sharded tensors count on every rank, replicated ones on TP rank 0 only, and the
    squares are summed over the model-parallel group."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if mpu is None or getattr(p, "tensor_model_parallel", False) or mpu.get_model_parallel_rank() == 0:
            sq += p.grad.detach().double().pow(2).sum().cpu()
    if mpu is not None and mpu.get_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sq, group=mpu.get_model_parallel_group())
    return sq.sqrt().item()


def engine_step(
    engine,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    measure_grad_norm: bool,
    mpu=None,
) -> tuple[torch.Tensor, float | None]:
    """Forward/backward every micro-batch, stepping the engine after each.

    DeepSpeed scales each micro-batch loss by ``1 / accumulation`` and applies the
    optimizer at the accumulation boundary (the last micro-batch).

    Args:
        micro_batches: ``accum`` pairs of (tokens, labels), each (micro_batch, T).
        measure_grad_norm: compute the global gradient norm before the step. Needed
            for ZeRO-0 fp32, where DeepSpeed clips but does not keep the norm.
        mpu: the model-parallel unit handed to DeepSpeed (for the norm across TP).

    Returns:
        (this rank's mean micro-batch loss as a 0-d tensor, grad norm or ``None``).
    """
    losses, gnorm = [], None
    for i, (x, y) in enumerate(micro_batches):
        loss = engine(x.to(device), y.to(device))
        engine.backward(loss)
        if measure_grad_norm and i == len(micro_batches) - 1:
            gnorm = grad_norm(engine.module.parameters(), mpu)
        engine.step()
        losses.append(loss.detach())
    if gnorm is None and engine.get_global_grad_norm() is not None:
        gnorm = float(engine.get_global_grad_norm())
    return torch.stack(losses).mean(), gnorm
