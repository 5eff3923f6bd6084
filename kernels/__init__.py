"""Fused Triton kernels for the hot path, each with a PyTorch reference and fallback.

Every op takes ``impl="auto" | "triton" | "torch"`` (config key ``model.kernels``);
the rule lives in :mod:`kernels.dispatch`, the self-test behind ``auto`` in
:mod:`kernels.verify`. The Triton paths are ``torch.library`` custom ops
(``megalm::*``), opaque to ``torch.compile``. Importing this package registers
those ops and nothing more: no device query, no kernel module (they load on the
first Triton launch).
"""

from kernels.attention import (
    attention_backward,
    attention_forward,
    flash_attention,
    unfused_attention,
)
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
    "attention_backward",
    "attention_forward",
    "cross_entropy",
    "cross_entropy_partials",
    "cross_entropy_slice_grad",
    "flash_attention",
    "layer_norm",
    "rms_norm",
    "scaled_masked_softmax",
    "unfused_attention",
    "use_triton",
    "vocab_parallel_cross_entropy",
]
