"""Interpreted and compiled Triton launches in one process, chosen per launch by device.

How triton 3.9 reads ``TRITON_INTERPRET``: ``@triton.jit`` checks
``knobs.runtime.interpret`` (the variable, read live) when it *decorates*
(``triton/runtime/jit.py``, ``jit``), returning an ``InterpretedFunction`` or a
``JITFunction`` for good. That happens for our kernels when their module is
imported, and for triton's own ``tl.sum``, ``tl.max``, ``tl.zeros``, ...
(``triton/language/standard.py``) at ``import triton``, which ``import torch``
already does. So a variable set by a test fixture comes too late to make any
kernel interpreted, and one exported before Python starts makes the whole
process interpreted, CUDA launches included.

This module makes the mode a property of the launch instead:

* :func:`kernel_module` imports a ``kernel.py`` with the interpreter off, so its
  kernels are always ``JITFunction`` objects (compiled when launched on CUDA).
* :func:`launcher` returns, for a launch on CPU tensors, an interpreted twin of
  the kernel (an ``InterpretedFunction`` over the same Python function).
* Inside a twin's launch, calls to other ``@triton.jit`` functions (our helpers,
  and triton's own ``tl.sum`` etc.) run interpreted too: ``JITFunction.__call__``,
  which otherwise only raises "Cannot call @triton.jit'd outside of the scope of
  a kernel", is extended to do so while a twin is running on this thread. Each
  such call patches ``triton.language`` for the interpreter and restores it
  afterwards, so compiled kernels built later in the process see the real
  language. Compiled code never goes through ``JITFunction.__call__``.

If the process was started with ``TRITON_INTERPRET=1`` (triton's own library is
then interpreted), every launch takes the interpreted twin, as the user asked.

Written against triton 3.9's interpreter (``InterpretedFunction``,
``_patch_lang``); tested there (tests/kernels/test_dispatch.py).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from types import ModuleType

import torch

from kernels.dispatch import interpreted

_state = threading.local()
_import_lock = threading.Lock()


def kernel_module(name: str) -> ModuleType:
    """Import the ``@triton.jit`` module ``name`` with the interpreter off (JITFunctions)."""
    with _import_lock:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            return importlib.import_module(name)
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous


def launcher(kernel, t: torch.Tensor):
    """What to index with the grid for a launch on ``t``: the kernel, or its interpreted twin."""
    from triton.runtime.jit import JITFunction

    if not interpreted(t) and isinstance(kernel, JITFunction) and not _stdlib_interpreted():
        return kernel
    return _twin(kernel.fn)


@functools.cache
def _stdlib_interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


@functools.cache
def _twin(fn):
    """An ``InterpretedFunction`` over a kernel's Python function ``fn`` that flags its launches.

    Keyed by the plain function: hashing a ``JITFunction`` computes its cache key,
    which must not happen while the interpreter has ``triton.language`` patched.
    """
    from triton.runtime.interpreter import InterpretedFunction

    _route_device_calls()

    class _Twin(InterpretedFunction):
        def run(self, *args, grid, warmup, **kwargs):
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                return super().run(*args, grid=grid, warmup=warmup, **kwargs)
            finally:
                _state.depth -= 1

    return _Twin(fn)


@functools.cache
def _route_device_calls() -> None:
    """Let ``@triton.jit`` functions be called from inside an interpreted twin (once per process)."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def __call__(self, *args, **kwargs):
        if getattr(_state, "depth", 0) == 0:
            return original(self, *args, **kwargs)
        twin = _twin(self.fn)
        scope = interpreter._patch_lang(twin.fn)  # a _LangPatchScope in triton 3.9
        try:
            return twin.rewrite()(*args, **kwargs)
        finally:
            if scope is not None:
                scope.restore()

    JITFunction.__call__ = __call__
