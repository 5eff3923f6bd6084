"""Launchers for the cross-entropy kernels (``kernel.py``); registered as ops in ``ops.py``."""

from __future__ import annotations

import torch
import triton

from kernels.dispatch import interpreted
from kernels.interpreter import kernel_module, launcher

KERNELS = "kernels.cross_entropy.kernel"


def block_for(n_cols: int, t: torch.Tensor) -> int:
    """Columns per block: up to 4096 (64 under the interpreter, so tests span blocks)."""
    cap = 64 if interpreted(t) else 4096
    return min(cap, max(16, triton.next_power_of_2(max(n_cols, 1))))


def _num_warps(block: int, t: torch.Tensor) -> int:
    return 1 if interpreted(t) else max(1, min(16, block // 256))


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def partials_forward(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on (N, V_local) logits and (N,) labels.

    Returns:
        (row_max, sum_exp, target_logit), each (N,) fp32.
    """
    logits, labels = _rows(logits), labels.contiguous()
    n_rows, n_cols = logits.shape
    out = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if n_rows > 0:
        block = block_for(n_cols, logits)
        launcher(kernel_module(KERNELS)._cross_entropy_fwd_kernel, logits)[(n_rows,)](
            logits, labels, *out, logits.stride(0), n_cols, vocab_start,
            BLOCK_V=block, num_warps=_num_warps(block, logits),
        )  # fmt: skip
    return out[0], out[1], out[2]


def slice_grad_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_start: int,
) -> torch.Tensor:
    """Launch the backward kernel; returns dlogits (N, V_local) in the logits' dtype."""
    logits, labels = _rows(logits), labels.contiguous()
    n_rows, n_cols = logits.shape
    dlogits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows > 0 and n_cols > 0:
        block = block_for(n_cols, logits)
        launcher(kernel_module(KERNELS)._cross_entropy_bwd_kernel, logits)[(n_rows,)](
            logits, labels, lse.float().contiguous(), grad_loss.contiguous(), dlogits,
            logits.stride(0), dlogits.stride(0), n_cols, vocab_start,
            BLOCK_V=block, num_warps=_num_warps(block, logits),
        )  # fmt: skip
    return dlogits
