"""The norm kernels as ``torch.library`` custom ops (opaque to ``torch.compile``).

``megalm::norm_fwd`` and ``megalm::norm_bwd`` wrap the launchers of ``function.py``;
``register_fake`` gives their output shapes for tracing, and ``register_autograd``
makes ``norm_fwd`` differentiable through ``norm_bwd``. Registering imports no
triton: the launchers load on the first real call.
"""

from __future__ import annotations

import torch

from kernels.dispatch import device_guard


@torch.library.custom_op("megalm::norm_fwd", mutates_args=())
def norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, is_rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) of RMSNorm (``is_rms``) or LayerNorm over x's last dim; see function.py."""
    from kernels.norms.function import norm_forward

    with device_guard(x):
        return norm_forward(x, weight, bias, eps, is_rms)


@norm_fwd.register_fake
def _norm_fwd_fake(x, weight, bias, eps, is_rms):
    n_rows = x.numel() // x.shape[-1]
    stats = x.new_empty(n_rows, dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(0 if is_rms else n_rows, dtype=torch.float32), stats


@torch.library.custom_op("megalm::norm_bwd", mutates_args=())
def norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) of :func:`norm_fwd`; db is empty when there is no bias."""
    from kernels.norms.function import norm_backward

    with device_guard(x):
        return norm_backward(grad_y, x, weight, bias, mean, rstd, is_rms)


@norm_bwd.register_fake
def _norm_bwd_fake(grad_y, x, weight, bias, mean, rstd, is_rms):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _eps, is_rms = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.is_rms = is_rms


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = norm_bwd(grad_y, x, weight, bias, mean, rstd, ctx.is_rms)
    return dx, dw, db if bias is not None else None, None, None


norm_fwd.register_autograd(_backward, setup_context=_setup_context)
