"""One rule for choosing between the Triton kernels and the PyTorch path.

Every public op in ``kernels/`` takes ``impl: "auto" | "triton" | "torch"`` (the
``model.kernels`` config key) and asks :func:`use_triton` which path to run:

* ``"torch"``: always the PyTorch path (the op's ``reference.py``, or
  ``F.scaled_dot_product_attention`` for attention).
* ``"auto"``: Triton when every tensor is on CUDA and ``triton`` imports; the
  PyTorch path otherwise (CPU tensors, no triton installed).
* ``"triton"``: force Triton. On CUDA this needs ``triton``; on CPU it works only
  under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernel
  modules are first imported), which is how the test suite runs the kernels.
  Anything else raises :class:`KernelUnavailableError` with the reason.

Nothing here runs at import time: no device queries, no triton import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")


class KernelUnavailableError(RuntimeError):
    """Raised when ``impl="triton"`` is requested but the kernels cannot run."""


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (checked once, on first use)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is "unavailable", not a crash
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether the Triton interpreter is requested (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is decorated, so it must be set
    before the first kernel module is imported (tests/kernels/conftest.py does).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors: torch.Tensor | None) -> bool:
    """Decide whether an op runs its Triton kernel.

    Args:
        impl: ``"auto"``, ``"triton"`` or ``"torch"``.
        *tensors: the op's tensor inputs (``None`` entries are ignored).

    Returns:
        True for the Triton path, False for the PyTorch path.

    Raises:
        ValueError: unknown ``impl``.
        KernelUnavailableError: ``impl="triton"`` where Triton cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if impl == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise KernelUnavailableError(
            "impl='triton' requested but triton is not importable; "
            "install it (pip install 'megalm[triton]') or use impl='auto'/'torch'"
        )
    if on_cuda:
        return True
    if any(t.is_cuda for t in present):
        raise KernelUnavailableError("impl='triton' needs all inputs on the same CUDA device")
    if not interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise KernelUnavailableError(
            f"impl='triton' with tensors on {devices}: Triton kernels run on CUDA, or on CPU "
            "only under the interpreter (export TRITON_INTERPRET=1 before importing kernels); "
            "use impl='auto' or 'torch' for the PyTorch path"
        )
    return True


def interpreter_needs_fp32_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 before the dot.

    The Triton interpreter (checked on triton 3.9) computes ``tl.dot`` on
    bfloat16 operands from their raw bits and returns garbage; fp16 and fp32 are
    fine. Kernels take an ``UPCAST_DOT`` constexpr that, when set, rounds the
    operands to the input dtype first (so the numerics match the GPU path) and
    then upcasts them to fp32. On CUDA this is always False.
    """
    return interpreter_enabled() and dtype == torch.bfloat16


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current device for a launch (Triton launches on the current one).

    Autograd's backward threads already run on the tensors' device; the forward
    may not (e.g. tensors on cuda:1 while cuda:0 is current).
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
