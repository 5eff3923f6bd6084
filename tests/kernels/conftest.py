"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

Triton decides interpreter-or-compiler when a kernel is decorated, so the
variable must be set before the first kernel module is imported. The kernel
modules load lazily (first Triton call), and nothing else in the suite uses
Triton, so setting it here, at collection, is early enough. ``setdefault`` keeps
an explicit ``TRITON_INTERPRET=0`` (for running these tests compiled on a GPU).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.dispatch import interpreter_enabled, triton_available  # noqa: E402


def triton_device() -> str:
    """Where the Triton path runs in these tests: CUDA when compiled, else CPU (interpreter)."""
    return "cpu" if interpreter_enabled() else "cuda"


@pytest.fixture
def device() -> str:
    if not triton_available():
        pytest.skip("triton is not installed")
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device")
    return triton_device()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
