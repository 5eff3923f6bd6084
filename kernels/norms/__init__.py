"""RMSNorm and LayerNorm with optional fused residual add, Triton or PyTorch."""

from __future__ import annotations

import torch

from kernels.dispatch import device_guard, use_triton
from kernels.norms.reference import layer_norm_reference, rms_norm_reference

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ok(impl: str, x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    from_dispatch = use_triton(impl, x, *others)
    if not from_dispatch:
        return False
    from kernels.norms.kernel import MAX_BLOCK, block_for

    dtypes_ok = all(t.dtype in _TRITON_DTYPES for t in (x, *others) if t is not None)
    return dtypes_ok and block_for(x.shape[-1]) <= MAX_BLOCK


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        x: (..., H).
        weight: (H,).
        eps: added to the mean square.
        residual: (..., H) or None. When given, computes ``h = x + residual`` (in the
            promoted dtype), normalizes ``h`` and returns ``(out, h)``.
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        ``out`` (..., H) in x's dtype, or ``(out, h)`` with a residual. Differentiable
        w.r.t. x, weight and residual.
    """
    _check(x, weight, residual)
    if not _triton_ok(impl, x, weight, residual):
        return rms_norm_reference(x, weight, eps, residual)
    from kernels.norms.kernel import NormFunction

    with device_guard(x):
        return NormFunction.apply(x, weight, None, residual, eps, True)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm (Ba et al. 2016): ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: (..., H).
        weight: (H,).
        bias: (H,) or None.
        eps: added to the (biased) variance.
        residual: (..., H) or None; as in :func:`rms_norm`.
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        ``out`` (..., H) in x's dtype, or ``(out, h)`` with a residual. Differentiable
        w.r.t. x, weight, bias and residual.
    """
    _check(x, weight, residual)
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")
    if not _triton_ok(impl, x, weight, bias, residual):
        return layer_norm_reference(x, weight, bias, eps, residual)
    from kernels.norms.kernel import NormFunction

    with device_guard(x):
        return NormFunction.apply(x, weight, bias, residual, eps, False)
