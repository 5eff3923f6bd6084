"""Measuring what the analytic models predict: activation bytes, model-state bytes, collective time.

- Activation bytes: every tensor autograd saves for the backward during one
  forward (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage,
  parameters and buffers excluded. This is the memory a forward pins until its
  backward runs, the quantity of Korthikanti et al. 2022, section 4.
- Model-state bytes: every live tensor storage in the process (found through the
  garbage collector, plus each parameter's ``.grad``, which has no Python object
  until touched), minus module buffers. Taken after the backward of an optimizer
  step and again after the step, so parameters, gradients and optimizer states
  (whatever flat buffers and partitions DeepSpeed keeps) are all counted.
- Communication time: wall time spent inside ``torch.distributed`` collectives,
  which DeepSpeed and megalm's TP layers both call. Gloo collectives are
  synchronous, so on CPU this is the full time; for ``async_op=True`` calls and on
  NCCL only the launch is timed unless the caller synchronizes.
"""

from __future__ import annotations

import functools
import gc
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "all_reduce_coalesced",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


class CommTimer:
    """Accumulates seconds spent in ``torch.distributed`` collectives once :meth:`install` ran."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._originals: dict[str, Callable] = {}

    def install(self) -> None:
        """Wrap the collectives of ``torch.distributed`` (call before DeepSpeed initializes)."""
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None or name in self._originals:
                continue
            self._originals[name] = fn

            @functools.wraps(fn)
            def timed(*args, __fn=fn, **kwargs):
                t0 = time.perf_counter()
                try:
                    return __fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1

            setattr(dist, name, timed)

    def uninstall(self) -> None:
        """Restore the original functions."""
        for name, fn in self._originals.items():
            setattr(dist, name, fn)
        self._originals.clear()

    def take(self) -> float:
        """Seconds since the last ``take`` (and reset)."""
        s, self.seconds = self.seconds, 0.0
        return s


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


@contextmanager
def saved_activation_bytes(model: nn.Module, enabled: bool = True) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves for backward inside the ``with`` block.

    Yields a dict whose ``"bytes"`` is filled when the block exits: the sum over
    distinct storages of saved tensors that are not parameters or buffers of ``model``.
    """
    excluded = {_storage_key(p)[0] for p in model.parameters()}
    excluded |= {_storage_key(b)[0] for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr not in excluded and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    out = {"bytes": 0}
    if not enabled:
        yield out
        return
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def live_tensor_bytes(model: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of every distinct live tensor storage (on ``device`` if given), buffers excluded.

    Found through :func:`gc.get_objects` plus each parameter's ``.grad``. Module
    buffers (RoPE tables) are excluded: they are neither parameters nor states.
    """
    gc.collect()
    buffers = {_storage_key(b)[0] for b in model.buffers()}
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if device is not None and t.device.type != device.type:
            return
        if t.is_meta or t.layout != torch.strided:
            return
        ptr, nbytes = _storage_key(t)
        if ptr and ptr not in buffers:
            storages[ptr] = max(storages.get(ptr, 0), nbytes)

    with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    add(obj)
            except (ReferenceError, RuntimeError):  # dead weakproxies, freed storages
                continue
    for p in model.parameters():
        if p.grad is not None:
            add(p.grad)
    return sum(storages.values())
