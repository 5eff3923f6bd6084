"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

Triton decides interpreter-or-compiler when a kernel is decorated, so the
variable must be set before the first kernel module is imported. The kernel
modules load lazily (first Triton call), and nothing else in the suite uses
Triton, so setting it here, at collection, is early enough. ``setdefault`` keeps
an explicit ``TRITON_INTERPRET=0`` (for running these tests compiled on a GPU).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.dispatch import interpreter_enabled, triton_available  # noqa: E402


def triton_device() -> str:
    """Where the Triton path runs in these tests: CUDA when compiled, else CPU (interpreter)."""
    return "cpu" if interpreter_enabled() else "cuda"


@functools.cache
def interpreter_problem() -> str | None:
    """Why this triton + numpy cannot interpret our kernels, or None.

    Loop bounds computed from ``tl.program_id`` (causal attention, row chunks) fail
    under triton 3.6's interpreter with numpy >= 2.4 ("only 0-dimensional arrays can
    be converted to Python scalars"); triton 3.9 is fine, and so is 3.6 with numpy 2.3.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(X):
        pid = tl.program_id(0)
        for i in range(0, pid + 1):
            tl.store(X + i, i)

    try:
        _probe_kernel[(2,)](torch.zeros(2))
    except Exception as err:  # any failure means "cannot interpret"
        import numpy

        return f"triton {triton.__version__} interpreter with numpy {numpy.__version__}: {err!r}"
    return None


@pytest.fixture
def device() -> str:
    if not triton_available():
        pytest.skip("triton is not installed")
    if not interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device")
    if interpreter_enabled() and (problem := interpreter_problem()):
        pytest.skip(f"cannot interpret Triton kernels here ({problem}); use triton>=3.9 or numpy<2.4")
    return triton_device()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
