"""Fused Triton kernels for the hot path, each with a PyTorch reference and fallback.

Every op takes ``impl="auto" | "triton" | "torch"`` (config key ``model.kernels``);
the rule lives in :mod:`kernels.dispatch`. Importing this package imports neither
triton nor CUDA: the Triton kernel modules load on first use.
"""

from kernels.attention import flash_attention
from kernels.cross_entropy import (
    CrossEntropyPartials,
    cross_entropy,
    cross_entropy_partials,
    cross_entropy_slice_grad,
    vocab_parallel_cross_entropy,
)
from kernels.dispatch import KernelUnavailableError, use_triton
from kernels.norms import layer_norm, rms_norm
from kernels.softmax import scaled_masked_softmax

__all__ = [
    "CrossEntropyPartials",
    "KernelUnavailableError",
    "cross_entropy",
    "cross_entropy_partials",
    "cross_entropy_slice_grad",
    "flash_attention",
    "layer_norm",
    "rms_norm",
    "scaled_masked_softmax",
    "use_triton",
    "vocab_parallel_cross_entropy",
]
