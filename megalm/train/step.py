"""One optimizer step through the DeepSpeed engine (shared by the trainer and the benchmark)."""

from __future__ import annotations

import torch


def engine_step(
    engine,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    measure_grad_norm: bool,
) -> tuple[torch.Tensor, float | None]:
    """Forward/backward every micro-batch, stepping the engine after each.

    DeepSpeed scales each micro-batch loss by ``1 / accumulation`` and applies the
    optimizer at the accumulation boundary (the last micro-batch).

    Args:
        micro_batches: ``accum`` pairs of (tokens, labels), each (micro_batch, T).
        measure_grad_norm: compute the global gradient norm before the step. Needed
            for ZeRO-0 fp32, where DeepSpeed clips but does not keep the norm.

    Returns:
        (this rank's mean micro-batch loss as a 0-d tensor, grad norm or ``None``).
    """
    losses, gnorm = [], None
    for i, (x, y) in enumerate(micro_batches):
        loss = engine(x.to(device), y.to(device))
        engine.backward(loss)
        if measure_grad_norm and i == len(micro_batches) - 1:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        engine.step()
        losses.append(loss.detach())
    if gnorm is None and engine.get_global_grad_norm() is not None:
        gnorm = float(engine.get_global_grad_norm())
    return torch.stack(losses).mean(), gnorm
