"""Measuring what the analytic models predict: activation bytes, model-state bytes, step time.

- Activation bytes: every tensor autograd saves for the backward during one
  forward (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage,
  parameters (also ZeRO-3's temporarily gathered ones) and buffers excluded. This is
  the memory a forward pins until its backward runs, the quantity of Korthikanti et
  al. 2022, section 4. ``launch/bench_recompute.py`` and the benchmark both use it.
- Model-state bytes: every live tensor storage in the process (found through the
  garbage collector, plus each parameter's ``.grad``, which has no Python object
  until touched), minus module buffers. Taken after the backward of an optimizer
  step and again after the step, so parameters, gradients and optimizer states
  (whatever flat buffers and partitions DeepSpeed keeps) are all counted.
- Communication time: wall time spent inside ``torch.distributed`` collectives,
  which DeepSpeed and megalm's TP layers both call. Gloo collectives are
  synchronous, so on CPU this is the full time; for ``async_op=True`` calls and on
  NCCL only the launch is timed unless the caller synchronizes.
- Step time in phases: :class:`StepTimer` is the timing hook the trainer's own step
  (``Strategy.train_step(micro_batches, timer)``) reports its phases to.
- Side by side: :func:`alternate` runs two (or more) variants in one process, ABBA, so a
  ratio of their medians (:func:`throughput`) compares them under the same machine noise;
  ``launch/bench_hf.py``, ``launch/bench_recompute.py``, :mod:`megalm.perf.step_compare`
  and :mod:`megalm.perf.generation` all do.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

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
    distinct storages of saved tensors that are neither buffers of ``model`` nor the
    storage of one of its parameters *at the moment the tensor is saved*. The second
    test matters under ZeRO-3: a layer saves its weight while the weight is gathered
    into a temporary full-size storage, which DeepSpeed frees after the layer (the
    saved parameter keeps no reference to it and is gathered again for the
    backward). Counting those storages would add whichever gathered weights happen to
    have distinct addresses, a figure that moves with allocator timing.
    """
    buffers = {_storage_key(b)[0] for b in model.buffers()}
    params = list(model.parameters())
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage_key(t)
        if ptr in seen:
            seen[ptr] = max(seen[ptr], nbytes)
        elif ptr and ptr not in buffers and ptr not in {_storage_key(p)[0] for p in params}:
            seen[ptr] = nbytes  # ^ the parameters' storages now, not when the block began
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    sides: dict[Hashable, Callable[[int], tuple[Any, float]]], timed: int, warmup: int = 0
) -> tuple[dict[Hashable, list[Any]], dict[Hashable, list[float]]]:
    """Run every side ``warmup + timed`` rounds in one process, alternating A B, B A, ... (ABBA).

    Each side meets the same drift (clock, caches, other load) in turn, so the ratio of
    their medians is fair. ``sides[key](i)`` runs round ``i`` and returns (a value, e.g. its
    loss or output, and its seconds).

    Returns:
        (every round's value, the timed rounds' seconds), each keyed like ``sides``.
    """
    keys = list(sides)
    values: dict[Hashable, list[Any]] = {k: [] for k in keys}
    seconds: dict[Hashable, list[float]] = {k: [] for k in keys}
    for i in range(warmup + timed):
        for k in keys if i % 2 == 0 else keys[::-1]:
            value, s = sides[k](i)
            values[k].append(value)
            if i >= warmup:
                seconds[k].append(s)
    return values, seconds


def throughput(seconds: dict[Hashable, list[float]], tokens: int, flops_per_token: float) -> dict[str, dict]:
    """Per side: ``median_step_s``, ``tokens_per_s`` and model ``tflops`` of steps of ``tokens`` tokens."""
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "median_step_s": med,
        "tokens_per_s": {k: tokens / s for k, s in med.items()},
        "tflops": {k: tokens * flops_per_token / s / 1e12 for k, s in med.items()},
    }


def max_rel_diff(values: list[float], reference: list[float]) -> float:
    """``max |v_i - r_i| / |r_i|`` over paired values (same length)."""
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference, strict=True))


class StepTimer:
    """The benchmark's timing hook for ``Strategy.train_step`` (a ``megalm.train.step.PhaseTimer``).

    Between :meth:`begin` and :meth:`end` (one optimizer step) it sums the seconds of each
    ``forward``, ``backward`` and ``optimizer`` phase the step reports, each closed by a
    device synchronize; :meth:`end` adds the step's wall time and the time spent in
    collectives (:class:`CommTimer`, which overlaps the phases). Steps passed to
    :meth:`end` with ``timed=False`` (warm-up) count in no total.

    Memory is measured on request, in steps that should not be timed:
    ``activations=True`` counts the bytes saved by the step's first forward phase
    (:func:`saved_activation_bytes`, one micro-batch); ``states=True`` takes
    :func:`live_tensor_bytes` before the step's last optimizer phase (the accumulation
    boundary: the gradients are complete) and after the step (the optimizer states
    exist), keeping the larger. Earlier optimizer phases of a plain step fall inside
    gradient accumulation, where DeepSpeed's ZeRO 1-2 also hold transient gradient
    buffers that the model-state formula leaves out.
    """

    PHASES = ("forward", "backward", "optimizer")

    def __init__(self, model: nn.Module, device: torch.device, comm: CommTimer) -> None:
        self.model, self.device, self.comm = model, device, comm
        self.totals = dict.fromkeys((*self.PHASES, "comm", "step"), 0.0)
        self.steps = 0
        self.activation_bytes: int | None = None
        self.state_bytes = 0
        self._before_update = 0
        self._current = dict.fromkeys(self.PHASES, 0.0)
        self._activations = self._states = False
        self._t0 = 0.0

    def begin(self, activations: bool = False, states: bool = False) -> None:
        """Start one optimizer step (after its batches are loaded)."""
        self._activations, self._states = activations, states
        self._current = dict.fromkeys(self.PHASES, 0.0)
        synchronize(self.device)
        self.comm.take()
        self._t0 = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase of the step; ``name`` is ``forward``, ``backward`` or ``optimizer``."""
        if name == "optimizer" and self._states:  # the last one of the step counts
            self._before_update = live_tensor_bytes(self.model, self.device)
        measuring = name == "forward" and self._activations
        self._activations &= not measuring
        with saved_activation_bytes(self.model, enabled=measuring) as saved:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                synchronize(self.device)
                self._current[name] += time.perf_counter() - t0
        if measuring:
            self.activation_bytes = saved["bytes"]

    def end(self, timed: bool) -> None:
        """Close the step; add it to the totals when ``timed``."""
        synchronize(self.device)
        step_s = time.perf_counter() - self._t0
        comm_s = self.comm.take()
        if self._states:
            after = live_tensor_bytes(self.model, self.device)
            self.state_bytes = max(self.state_bytes, self._before_update, after)
        if timed:
            for name, seconds in self._current.items():
                self.totals[name] += seconds
            self.totals["comm"] += comm_s
            self.totals["step"] += step_s
            self.steps += 1

    def mean_seconds(self) -> dict[str, float]:
        """``{"forward_s", "backward_s", "optimizer_s", "comm_s", "step_s"}`` per timed step."""
        if not self.steps:
            raise ValueError("no timed step: call end(timed=True) at least once")
        return {f"{name}_s": total / self.steps for name, total in self.totals.items()}
