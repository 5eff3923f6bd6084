"""Plain PyTorch RMSNorm and LayerNorm: the definition of correct and the CPU fallback.

Conventions (both paths):

* RMSNorm (Zhang & Sennrich 2019, eq. 4): ``y = x / sqrt(mean(x^2) + eps) * w``.
* LayerNorm (Ba et al. 2016, eq. 4): ``y = (x - mean(x)) / sqrt(var(x) + eps) * w + b``
  with the biased variance.
* Statistics and the affine transform are computed in fp32 (fp64 for fp64
  input) and rounded once to ``x``'s dtype.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim.

    Args:
        x: (..., H).
        weight: (H,).
        eps: added to the mean square.

    Returns:
        (..., H) in x's dtype.
    """
    xf = x.to(_compute_dtype(x))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim (biased variance), optional bias.

    Args:
        x: (..., H).
        weight: (H,).
        bias: (H,) or None.
        eps: added to the variance.

    Returns:
        (..., H) in x's dtype.
    """
    xf = x.to(_compute_dtype(x))
    mean = xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = centered * rstd * weight.to(xf.dtype)
    if bias is not None:
        out = out + bias.to(xf.dtype)
    return out.to(x.dtype)
