"""Launchers for the norm kernels (``kernel.py``); registered as ops in ``ops.py``."""

from __future__ import annotations

import functools

import torch
import triton

from kernels.dispatch import interpreted
from kernels.interpreter import kernel_module, launcher

KERNELS = "kernels.norms.kernel"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Backward programs: a fixed function of rows and device (so runs are reproducible)."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * _sm_count(device.index or 0)))
    return max(1, min(n_rows, 4))


def _num_warps(block: int, t: torch.Tensor) -> int:
    return 1 if interpreted(t) else max(1, min(16, block // 256))


def block_for(n_cols: int) -> int:
    """Columns per block (the whole row), at least 16."""
    return max(16, triton.next_power_of_2(n_cols))


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., H) -> (N, H) with unit column stride (copies only if needed)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, is_rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on x (..., H).

    Returns:
        y (..., H) contiguous in x's dtype; mean (N,) fp32 for LayerNorm, (0,) for
        RMSNorm; rstd (N,) fp32; N = x.numel() // H.
    """
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    block = block_for(n_cols)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if is_rms else n_rows, dtype=torch.float32, device=x.device)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if n_rows > 0:
        launcher(kernel_module(KERNELS)._norm_fwd_kernel, x)[(n_rows,)](
            x2, weight, bias if bias is not None else weight, y, mean if not is_rms else rstd,
            rstd, x2.stride(0), n_cols, n_cols, float(eps),
            IS_RMS=is_rms, HAS_BIAS=bias is not None, BLOCK_N=block,
            num_warps=_num_warps(block, x),
        )  # fmt: skip
    return y, mean, rstd


def norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel.

    Returns:
        dx like x (contiguous), dw like weight, db like bias ((0,) when bias is None).
    """
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    dy = _rows(grad_y, n_cols)
    n_rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_programs = _num_programs(n_rows, x.device)
    dw = torch.zeros((n_programs, n_cols), dtype=torch.float32, device=x.device)
    db = torch.zeros_like(dw) if bias is not None else None
    block = block_for(n_cols)
    if n_rows > 0:
        launcher(kernel_module(KERNELS)._norm_bwd_kernel, x)[(n_programs,)](
            x2, weight.contiguous(), dy, dx, mean if not is_rms else rstd, rstd, dw,
            db if db is not None else dw, x2.stride(0), dy.stride(0), n_cols,
            n_rows, n_cols, triton.cdiv(n_rows, n_programs),
            IS_RMS=is_rms, HAS_BIAS=bias is not None, BLOCK_N=block,
            num_warps=_num_warps(block, x),
        )  # fmt: skip
    grad_w = dw.sum(0).to(weight.dtype)
    grad_b = db.sum(0).to(bias.dtype) if bias is not None else weight.new_empty(0)
    return dx, grad_w, grad_b
