"""Plain PyTorch RMSNorm and LayerNorm with optional fused residual add.

The definition of correct and the CPU fallback. Conventions (both paths):

* RMSNorm (Zhang & Sennrich 2019, eq. 4): ``y = x / sqrt(mean(x^2) + eps) * w``.
* LayerNorm (Ba et al. 2016, eq. 4): ``y = (x - mean(x)) / sqrt(var(x) + eps) * w + b``
  with the biased variance.
* Statistics and the affine transform are computed in fp32 (fp64 for fp64
  input) and rounded once to ``x``'s dtype.
* Residual (pre-norm block, as flash-attn's ``layer_norm_fn(residual=...)``):
  ``h = x + residual`` in PyTorch's promoted dtype of the two; the norm reads the
  rounded ``h``; the call returns ``(norm(h), h)``.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim.

    Args:
        x: (..., H).
        weight: (H,).
        eps: added to the mean square.
        residual: (..., H) or None; when given, normalizes ``h = x + residual``.

    Returns:
        (..., H) in x's dtype; or ``(out, h)`` when ``residual`` is given.
    """
    h = x if residual is None else x + residual
    hf = h.to(_compute_dtype(x))
    rstd = torch.rsqrt(hf.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (hf * rstd * weight.to(hf.dtype)).to(x.dtype)
    return out if residual is None else (out, h)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim (biased variance), optional bias.

    Args:
        x: (..., H).
        weight: (H,).
        bias: (H,) or None.
        eps: added to the variance.
        residual: (..., H) or None; when given, normalizes ``h = x + residual``.

    Returns:
        (..., H) in x's dtype; or ``(out, h)`` when ``residual`` is given.
    """
    h = x if residual is None else x + residual
    hf = h.to(_compute_dtype(x))
    mean = hf.mean(dim=-1, keepdim=True)
    centered = hf - mean
    rstd = torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = centered * rstd * weight.to(hf.dtype)
    if bias is not None:
        out = out + bias.to(hf.dtype)
    out = out.to(x.dtype)
    return out if residual is None else (out, h)
