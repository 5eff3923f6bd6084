"""Kernel tests run the Triton kernels compiled on CUDA, or interpreted on CPU.

The interpreter is scoped to the tests that ask for it: the ``device`` fixture
sets ``TRITON_INTERPRET=1`` (``monkeypatch``, so for that one test) when there is
no CUDA device, and nothing else in the pytest process or its subprocesses
(``tests.conftest.subprocess_env`` drops the variable) sees it. On a GPU machine
``device`` is ``"cuda"`` and the compiled kernels run, unless the session was
started with ``TRITON_INTERPRET=1`` to force the interpreter.

Compiled or interpreted is decided per launch by the tensors' device
(``kernels.dispatch.kernel_module`` keeps one copy of each kernel module per
mode), so interpreted and compiled launches can share a process. Kernel
self-test verdicts (``kernels.verify``) go to a per-session temporary cache,
never to the user's ``~/.cache``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from kernels import verify
from kernels.dispatch import triton_available

INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


def interpreter_forced() -> bool:
    """Whether the session was started with TRITON_INTERPRET=1 (interpret even with CUDA)."""
    return INTERPRET_AT_START not in (None, "", "0")


@functools.cache
def interpreter_problem() -> str | None:
    """Why this triton + numpy cannot interpret our kernels, or None (call with the interpreter on).

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
def interpreter(monkeypatch) -> str:
    """The Triton interpreter on CPU for this test only; returns the device, ``"cpu"``."""
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if problem := interpreter_problem():
        pytest.skip(f"cannot interpret Triton kernels here ({problem}); use triton>=3.9 or numpy<2.4")
    return "cpu"


@pytest.fixture
def device(request) -> str:
    """Where the Triton path runs in this test: ``"cuda"`` (compiled) or ``"cpu"`` (interpreted)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available() and not interpreter_forced():
        return "cuda"
    return request.getfixturevalue("interpreter")


@pytest.fixture
def interpreted_launches(interpreter, monkeypatch) -> list[str]:
    """The names of the Triton kernels the interpreter launches in this test, in launch order
    (``_norm_fwd_kernel`` ...); clear the list to count from a later point."""
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    original = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        launched.append(self.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", spy)
    return launched


@pytest.fixture(scope="session")
def kernel_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel_cache")


@pytest.fixture(autouse=True)
def _isolated(kernel_cache_dir, monkeypatch):
    """Seed 0; self-test verdicts in a session cache, in-process verdicts forgotten per test."""
    torch.manual_seed(0)
    monkeypatch.setenv(verify.CACHE_ENV, str(kernel_cache_dir))
    verify.forget()
    yield
    verify.forget()
