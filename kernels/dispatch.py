"""One rule for choosing between the Triton kernels and the PyTorch path, and where they run.

Every public op in ``kernels/`` takes ``impl: "auto" | "triton" | "torch"`` (the
``model.kernels`` config key) and asks :func:`use_triton` which path to run:

* ``"torch"``: always the PyTorch path (the op's ``reference.py``, or
  ``F.scaled_dot_product_attention`` for attention).
* ``"auto"``: Triton where Triton can run (see below) *and* the op's kernel passed
  its self-test on this device and dtype (:mod:`kernels.verify`: run once against
  the PyTorch reference, verdict cached on disk); the PyTorch path otherwise
  (CPU tensors, no triton, a kernel that failed its self-test).
* ``"triton"``: force Triton, no self-test. Anything that cannot run raises
  :class:`KernelUnavailableError` with the reason.

Where Triton runs: tensors on one CUDA device (compiled kernels), or CPU tensors
when the Triton interpreter is requested with ``TRITON_INTERPRET=1`` (how the
tests run the kernels without a GPU). The rule is the same for both, so
``auto`` on CPU under the interpreter self-tests and dispatches exactly as it
would on a GPU.

Compiled or interpreted is decided per launch by the tensors' device, not per
process (:func:`interpreted`; the mechanism is in :mod:`kernels.interpreter`).

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
    """Whether Triton may run on CPU tensors through its interpreter (``TRITON_INTERPRET=1``).

    Read at each dispatch, so a test can scope it with ``monkeypatch.setenv``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreted(where: torch.Tensor | torch.device | str) -> bool:
    """Whether a Triton launch on this tensor (or device) runs in the interpreter, not compiled.

    True on CPU. Launchers use it to pick the kernel object (:func:`kernels.interpreter.launcher`),
    tile sizes and dot precision. Anything else (CUDA, or ``meta`` in compile-only
    checks) is compiled.
    """
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return device.type == "cpu"


def use_triton(impl: str, *tensors: torch.Tensor | None, op: str) -> bool:
    """Decide whether an op runs its Triton kernel.

    Args:
        impl: ``"auto"``, ``"triton"`` or ``"torch"``.
        *tensors: the op's tensor inputs, main floating input first (its dtype is the
            one the self-test checks); ``None`` entries are ignored.
        op: the kernel's name in :data:`kernels.verify.CHECKS` (self-tested under auto).

    Returns:
        True for the Triton path, False for the PyTorch path.

    Raises:
        ValueError: unknown ``impl``.
        KernelUnavailableError: ``impl="triton"`` where Triton cannot run.
    """
    present = [t for t in tensors if t is not None]
    devices = tuple(sorted({str(t.device) for t in present}))
    dtype = present[0].dtype if present else None
    return _decide(impl, devices, dtype, op)


def constant_under_compile(fn):
    """:func:`torch.compiler.assume_constant_result` without its import of ``torch._dynamo``
    (about 1.2 s at every process start): the same marker, which dynamo reads only when it
    traces (tests/kernels/test_dispatch.py checks that torch still sets this marker)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def _decide(impl: str, devices: tuple[str, ...], dtype: torch.dtype | None, op: str) -> bool:
    """:func:`use_triton` on plain values. Under ``torch.compile`` it runs once at trace
    time and its answer is a constant of the graph (the self-test never gets traced)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    reason = _why_not(devices)
    if impl == "auto":
        if reason is not None:
            return False
        from kernels.verify import passed

        return passed(op, devices[0], dtype)
    if reason is not None:
        raise KernelUnavailableError(reason)
    return True


def _why_not(devices: tuple[str, ...]) -> str | None:
    """Why Triton cannot run on tensors on ``devices``, or None when it can."""
    if not triton_available():
        return (
            "impl='triton' requested but triton is not importable; "
            "install it (pip install 'megalm[triton]') or use impl='auto'/'torch'"
        )
    if len(devices) != 1:
        return f"impl='triton' needs every input on one device, got {list(devices)}"
    kind = torch.device(devices[0]).type
    if kind == "cuda":
        return None
    if kind == "cpu" and interpreter_enabled():
        return None
    return (
        f"impl='triton' with tensors on {list(devices)}: Triton kernels run on CUDA, or on CPU "
        "only under the interpreter (export TRITON_INTERPRET=1); use impl='auto' or 'torch' "
        "for the PyTorch path"
    )


def needs_fp32_dot(t: torch.Tensor) -> bool:
    """Whether ``tl.dot`` operands must be upcast to fp32 before the dot.

    The Triton interpreter (checked on triton 3.9) computes ``tl.dot`` on
    bfloat16 operands from their raw bits and returns garbage; fp16 and fp32 are
    fine. Kernels take an ``UPCAST_DOT`` constexpr that, when set, rounds the
    operands to the input dtype first (so the numerics match the GPU path) and
    then upcasts them to fp32. Compiled (CUDA) launches never need it.
    """
    return interpreted(t) and t.dtype == torch.bfloat16


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current device for a launch (Triton launches on the current one).

    Autograd's backward threads already run on the tensors' device; the forward
    may not (e.g. tensors on cuda:1 while cuda:0 is current).
    """
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
