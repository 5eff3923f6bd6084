"""RMSNorm and LayerNorm: Triton kernels (as custom ops) or the PyTorch reference."""

from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.norms.ops import norm_fwd
from kernels.norms.reference import layer_norm_reference, rms_norm_reference

__all__ = ["MAX_HIDDEN", "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]

MAX_HIDDEN = 32768  # the Triton kernels hold one row in one block
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_ok(impl: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not use_triton(impl, x, weight, bias, op="norms"):
        return False
    dtypes_ok = all(t.dtype in _TRITON_DTYPES for t in (x, weight, bias) if t is not None)
    return dtypes_ok and x.shape[-1] <= MAX_HIDDEN


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        x: (..., H).
        weight: (H,).
        eps: added to the mean square.
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        (..., H) in x's dtype; differentiable w.r.t. x and weight.
    """
    _check(x, weight, None)
    if not _triton_ok(impl, x, weight, None):
        return rms_norm_reference(x, weight, eps)
    return norm_fwd(x, weight, None, float(eps), True)[0]


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """LayerNorm (Ba et al. 2016): ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Args:
        x: (..., H).
        weight: (H,).
        bias: (H,) or None.
        eps: added to the (biased) variance.
        impl: "auto" | "triton" | "torch" (see kernels/dispatch.py).

    Returns:
        (..., H) in x's dtype; differentiable w.r.t. x, weight and bias.
    """
    _check(x, weight, bias)
    if not _triton_ok(impl, x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps)
    return norm_fwd(x, weight, bias, float(eps), False)[0]
