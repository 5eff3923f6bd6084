"""Launchers for the scale-mask-softmax kernels (``kernel.py``); ops in ``ops.py``."""

from __future__ import annotations

import torch
import triton

from kernels.dispatch import interpreted
from kernels.interpreter import kernel_module, launcher

KERNELS = "kernels.softmax.kernel"


def max_block(n_cols: int, t: torch.Tensor) -> int:
    """Columns per block: the whole row up to 4096 (64 under the interpreter)."""
    cap = 64 if interpreted(t) else 4096
    return min(cap, max(16, triton.next_power_of_2(n_cols)))


def _num_warps(block: int, t: torch.Tensor) -> int:
    return 1 if interpreted(t) else max(1, min(16, block // 256))


def _as_4d(scores: torch.Tensor, mask: torch.Tensor | None):
    """View scores as (B, H, Tq, Tk) and broadcast the mask to it by strides."""
    shape = scores.shape
    if scores.dim() > 4:
        if mask is not None:
            mask = torch.broadcast_to(mask, shape).reshape(-1, 1, *shape[-2:])
        scores = scores.reshape(-1, 1, *shape[-2:])
    while scores.dim() < 4:
        scores = scores.unsqueeze(0)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(scores.shape).view(torch.uint8)  # same bytes; pointer math on uint8
    return scores, mask


def softmax_forward(
    scores: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None,
    causal: bool,
    q_offset: int = 0,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel. Returns contiguous probabilities shaped like ``scores``.

    ``block`` overrides the columns per block (tests use it to force one or several
    blocks per row).
    """
    x, mask4 = _as_4d(scores, mask)
    b, h, tq, tk = x.shape
    block = block or max_block(tk, scores)
    y = torch.empty((b, h, tq, tk), dtype=scores.dtype, device=scores.device)
    if b * h * tq == 0 or tk == 0:
        return y.view(scores.shape)
    launcher(kernel_module(KERNELS)._softmax_fwd_kernel, scores)[(b * h * tq,)](
        x, mask4 if mask4 is not None else y, y, *x.stride(),
        *(mask4.stride() if mask4 is not None else (0, 0, 0, 0)),
        h, tq, tk, float(scale), int(q_offset),
        HAS_MASK=mask4 is not None, CAUSAL=causal, ONE_BLOCK=block >= tk, BLOCK_N=block,
        num_warps=_num_warps(block, scores),
    )  # fmt: skip
    return y.view(scores.shape)


def softmax_backward(
    y: torch.Tensor, grad_y: torch.Tensor, *, scale: float, block: int | None = None
) -> torch.Tensor:
    """Launch the backward kernel for contiguous ``y``; returns dx shaped like ``y``."""
    y = y.contiguous()
    grad_y = grad_y.contiguous()
    n_cols = y.shape[-1] if y.dim() else 1
    dx = torch.empty_like(y)
    n_rows = y.numel() // max(n_cols, 1)
    if n_rows == 0 or n_cols == 0:
        return dx
    block = block or max_block(n_cols, y)
    launcher(kernel_module(KERNELS)._softmax_bwd_kernel, y)[(n_rows,)](
        y, grad_y, dx, n_cols, float(scale), ONE_BLOCK=block >= n_cols, BLOCK_N=block,
        num_warps=_num_warps(block, y),
    )  # fmt: skip
    return dx
