"""Per-rank micro-batches from the global order, optionally built by DataLoader workers.

The pipeline, one generator stage per line of :meth:`TrainBatches._pipeline`:

1. ``_steps``: from the saved state (samples consumed, per-dataset counts), the
   global batch of every optimizer step as (dataset, window) pairs: the blend
   schedule picks the dataset, that dataset's epoch permutation the window;
2. ``_rank_slice``: this data-parallel rank's micro-batches of each step, the
   positions ``j*m*dp + dp_rank*m + [0, m)`` of micro-batch ``j``, so the samples
   of a step do not depend on ``dp`` or ``m`` (equal losses across layouts);
   ``_prefetch`` (remote data only): runs one optimizer step ahead and has the
   shards of those micro-batches fetched in the background, so a rank fetches
   exactly the shards its own windows read, just before it reads them;
3. ``_materialize``: windows gathered from the memory-mapped shards into
   tensors, in the main process (``workers=0``) or in worker processes, which
   take micro-batches as they free up and hand them back in order (at most two
   per worker in flight); with context parallelism (``cp > 1``) each tensor
   keeps this cp rank's tokens (chunks ``i`` and ``2cp-1-i`` of ``2 cp``,
   :func:`megalm.parallel.context.shard_sequence`), labels and position/document
   ids cut exactly like the tokens.

Every micro-batch travels with the state *after* its step, and the main process
records it only when the trainer has taken the whole step, so ``state_dict()``
is exact whatever the workers had prefetched: the workers are stateless and a
resume restarts them at the recorded position. Ranks are split by
``(dp_rank, dp_size)``, never by global rank and never by shard, so TP/PP peers
get identical batches, there is no hang with fewer shards than ranks x workers,
and every rank yields the same number of micro-batches. The cp ranks of one
data-parallel rank read the same windows and keep different tokens of them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megalm.data.order import BlendSchedule, GlobalOrderSampler
from megalm.data.packed import PackedWindows
from megalm.data.pool import bounded_imap
from megalm.data.shards import DataError
from megalm.parallel.context import shard_sequence


@dataclass(frozen=True)
class _MicroBatch:
    """One micro-batch to build: its (dataset, window) picks and the state after its step (or None)."""

    datasets: np.ndarray
    windows: np.ndarray
    state_after: tuple[int, tuple[int, ...]] | None


class _Builder:
    """Turns a :class:`_MicroBatch` into tensors (this cp rank's tokens); what each worker runs."""

    def __init__(self, sources: list[PackedWindows], with_ids: bool, cp: int = 1, cp_rank: int = 0) -> None:
        self.sources, self.with_ids, self.cp, self.cp_rank = sources, with_ids, cp, cp_rank

    def __getitem__(self, mb: _MicroBatch) -> tuple[tuple[torch.Tensor, ...], _MicroBatch]:
        if len(self.sources) == 1:
            tensors = self.sources[0].batch(mb.windows, self.with_ids)
        else:
            rows = [
                self.sources[k].batch(np.array([w]), self.with_ids)
                for k, w in zip(mb.datasets, mb.windows, strict=True)
            ]
            tensors = tuple(torch.cat(parts) for parts in zip(*rows, strict=True))
        return tuple(shard_sequence(t, self.cp, self.cp_rank) for t in tensors), mb


_worker_builder: _Builder | None = None


def _init_worker(builder: _Builder) -> None:
    global _worker_builder
    _worker_builder = builder


def _build(mb: _MicroBatch) -> tuple[list[np.ndarray], _MicroBatch]:
    """Worker side: the micro-batch as numpy arrays (cheap to send back)."""
    tensors, _ = _worker_builder[mb]
    return [t.numpy() for t in tensors], mb


_PREFETCH = ThreadPoolExecutor(1, thread_name_prefix="megalm-prefetch")  # builds the next step


class TrainBatches:
    """Micro-batches of one data-parallel rank over one or a blend of datasets.

    Args:
        windows: a :class:`PackedWindows`, or one per blended dataset.
        seed: ``data.seed``; dataset ``k`` of a blend permutes with ``seed + k``.
        global_batch: sequences per optimizer step (all ranks together).
        micro_batch: sequences per forward pass on this rank.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel degree.
        weights: blend weights, one per dataset (default: equal).
        workers: worker processes building micro-batches (0: build them in this process).
        with_ids: also return ``position_ids`` and ``doc_ids`` per micro-batch.
        cp_rank, cp_size: context parallelism: keep this cp rank's ``seq_len / cp`` tokens
            of every window (module docstring); the windows do not depend on it.
        prefetch: build the next step's micro-batches in a background thread while the
            current step trains (the order and the saved position are the same either way:
            the position moves when a step is handed out).

    ``pin`` (attribute, default off; the trainer sets it on CUDA): prefetched micro-batches
    are copied into page-locked memory, so the step's ``.to(device, non_blocking=True)``
    overlaps with compute.
    """

    def __init__(
        self,
        windows: PackedWindows | list[PackedWindows],
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        weights: list[float] | None = None,
        workers: int = 0,
        with_ids: bool = False,
        cp_rank: int = 0,
        cp_size: int = 1,
        prefetch: bool = False,
    ) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"training.global_batch ({global_batch}) must be divisible by "
                f"training.micro_batch ({micro_batch}) * dp ({dp_size})"
            )
        self.sources = list(windows) if isinstance(windows, list | tuple) else [windows]
        self.schedule = BlendSchedule(weights or [1.0] * len(self.sources))
        if len(self.schedule.weights) != len(self.sources):
            raise ValueError(f"{len(self.sources)} datasets but {len(self.schedule.weights)} blend weights")
        self.seed = seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.accum = global_batch // (micro_batch * dp_size)
        self.workers, self.with_ids = workers, with_ids
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.consumed = 0  # global samples consumed by completed steps
        self.counts = [0] * len(self.sources)  # of which from each dataset
        self.prefetch, self.pin = prefetch, False
        self._ahead: Future | None = None  # the next step, being built (with ``prefetch``)
        self._reset()

    def _reset(self) -> None:
        self.close()
        self.samplers = [GlobalOrderSampler(len(w), self.seed + k) for k, w in enumerate(self.sources)]
        self._it: Iterator | None = None

    # -- the pipeline --------------------------------------------------------------------
    def _pipeline(self) -> Iterator:
        steps = _steps(self.schedule, self.samplers, self.global_batch, self.consumed, list(self.counts))
        micro_batches = _rank_slice(steps, self.micro_batch, self.dp_size, self.dp_rank, self.accum)
        if any(w.remote for w in self.sources):
            # shards asked for one optimizer step ahead of the trainer: by this stage when the
            # trainer's thread builds, by the builder thread itself when ``prefetch`` runs it a step early
            micro_batches = _prefetch(micro_batches, self.sources, 0 if self.prefetch else self.accum)
        return self._materialize(micro_batches)

    def _materialize(self, micro_batches: Iterator[_MicroBatch]) -> Iterator:
        builder = _Builder(self.sources, self.with_ids, self.cp_size, self.cp_rank)
        if self.workers == 0:
            return (builder[mb] for mb in micro_batches)
        # forkserver: no fork of a process whose other threads may hold locks (DeepSpeed, gloo).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["megalm.data.loader"])
        self._pool = ctx.Pool(self.workers, _init_worker, (builder,))
        self._stop = threading.Event()
        ahead = 2 * self.workers  # prefetch two micro-batches per worker
        built = bounded_imap(self._pool, _build, micro_batches, ahead, self._stop)
        return ((tuple(torch.from_numpy(a) for a in arrays), mb) for arrays, mb in built)

    def close(self) -> None:
        """Stop the prefetch and the worker processes (a later ``step_batches`` starts new ones)."""
        ahead, self._ahead = getattr(self, "_ahead", None), None
        if ahead is not None:
            with contextlib.suppress(Exception):  # its error, if any, belongs to a step never taken
                ahead.result()
        if getattr(self, "_pool", None) is not None:
            self._stop.set()
            self._pool.terminate()
            self._pool = None
        self._it = None

    def __del__(self) -> None:
        self.close()

    # -- what the trainer calls ----------------------------------------------------------
    def step_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """The ``accum`` micro-batches of this rank for the next optimizer step.

        Each is (tokens, labels), or with ``with_ids`` (tokens, labels, position_ids,
        doc_ids); every tensor is (micro_batch, seq_len / cp) int64.
        """
        if self._it is None:
            self._it = self._pipeline()
        ahead, self._ahead = self._ahead, None
        out, (consumed, counts) = ahead.result() if ahead is not None else self._next_step()
        if self.prefetch:
            self._ahead = _PREFETCH.submit(self._next_step)
        self.consumed, self.counts = consumed, list(counts)
        return out

    def _next_step(self) -> tuple[list[tuple[torch.Tensor, ...]], tuple]:
        """The next step's micro-batches (pinned with ``pin``) and the position after them.
        Only one caller at a time: the trainer's thread, or the one prefetch in flight."""
        assert self._it is not None
        out = []
        for _ in range(self.accum):
            batch, mb = next(self._it)
            out.append(tuple(t.pin_memory() for t in batch) if self.pin else batch)
        return out, mb.state_after

    @property
    def epoch(self) -> float:
        """Fractional epochs completed (of the most-repeated dataset in a blend)."""
        return max(c / len(w) for c, w in zip(self.counts, self.sources, strict=True))

    @property
    def skipped(self) -> list[dict[str, list[str]]]:
        """Per dataset, the shards and documents the bad-data policy left out."""
        return [_skipped(w) for w in self.sources]

    def state_dict(self) -> dict:
        """The exact position: samples consumed, per-dataset counts, and what identifies the data."""
        return {
            "consumed": self.consumed,
            "counts": list(self.counts),
            "seed": self.seed,
            "n_windows": [len(w) for w in self.sources],
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``, at this (possibly different) data-parallel size.

        If the checkpointed run skipped bad shards or documents that this run reads
        fine, they are left out again so the order is the same.

        Raises:
            DataError: the data or seed differ from the checkpoint's.
        """
        saved_skips = state.get("skipped", self.skipped)
        if saved_skips != self.skipped:
            self.sources = [_reopen(w, s) for w, s in zip(self.sources, saved_skips, strict=True)]
            if saved_skips != self.skipped:
                raise DataError(
                    f"the checkpoint skipped {saved_skips}, this run skips {self.skipped}; "
                    "restore the original shards or start fresh with training.resume=never"
                )
        n_windows = [len(w) for w in self.sources]
        saved_n = state["n_windows"] if isinstance(state["n_windows"], list) else [state["n_windows"]]
        if saved_n != n_windows or state["seed"] != self.seed:
            raise DataError(
                f"checkpoint was made on data with {saved_n} windows and seed {state['seed']}, this run has "
                f"{n_windows} and {self.seed}; resume with the same data.dir, data.seed and model.seq_len, "
                "or start fresh with training.resume=never"
            )
        self.consumed = state["consumed"]
        self.counts = list(state.get("counts", [state["consumed"]]))
        self._reset()


# The stages are plain functions: a generator that held ``self`` would keep the loader alive
# from the worker pool's feeder thread, and it could never be closed by garbage collection.
def _steps(
    schedule: BlendSchedule,
    samplers: list[GlobalOrderSampler],
    global_batch: int,
    consumed: int,
    counts: list[int],
) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
    """(dataset, window) of every sample of each global batch, and the state after it."""
    while True:
        which, local, after = schedule.assign(consumed, counts, global_batch)
        windows = np.empty(global_batch, dtype=np.int64)
        for k, sampler in enumerate(samplers):
            mask = which == k
            windows[mask] = sampler.indices(counts[k], int(mask.sum()))  # local positions are consecutive
        consumed, counts = consumed + global_batch, after
        yield which, windows, (consumed, tuple(counts))


def _rank_slice(steps: Iterator, m: int, dp: int, dp_rank: int, accum: int) -> Iterator[_MicroBatch]:
    """This rank's micro-batches: positions ``j*m*dp + dp_rank*m + [0, m)``."""
    for which, windows, state in steps:
        for j in range(accum):
            s = slice(j * m * dp + dp_rank * m, j * m * dp + dp_rank * m + m)
            yield _MicroBatch(which[s], windows[s], state if j == accum - 1 else None)


def _prefetch(micro_batches: Iterator[_MicroBatch], sources: list[PackedWindows], ahead: int) -> Iterator:
    """Pass micro-batches on ``ahead`` late, having asked for each one's shards on arrival."""
    queued: deque[_MicroBatch] = deque()
    for mb in micro_batches:
        for k, w in zip(mb.datasets, mb.windows, strict=True):
            sources[k].prefetch(int(w))
        queued.append(mb)
        if len(queued) > ahead:
            yield queued.popleft()


def _skipped(windows: PackedWindows) -> dict[str, list[str]]:
    bad = getattr(windows.docs, "bad", None)
    return {k: sorted(v) for k, v in bad.skipped.items()} if bad else {"shards": [], "documents": []}


def _reopen(windows: PackedWindows, exclude: dict[str, list[str]]) -> PackedWindows:
    """The same split with ``exclude`` left out; raises if this run skips something the checkpoint did not."""
    new_bad = [x for k in ("shards", "documents") for x in _skipped(windows)[k] if x not in exclude[k]]
    if new_bad or not hasattr(windows.docs, "reopen"):
        raise DataError(
            f"this run skips {new_bad}, which the checkpoint read; the global order would "
            "change: restore those files or start fresh with training.resume=never"
        )
    return PackedWindows(windows.docs.reopen(exclude), windows.seq_len, windows.eos_id)


def eval_batches(
    windows: PackedWindows,
    n_samples: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    with_ids: bool = False,
    cp_rank: int = 0,
    cp_size: int = 1,
) -> list[tuple[torch.Tensor, ...]]:
    """The first ``n_samples`` windows (wrapping if fewer), rank ``d`` taking every dp-th, each
    cut to this cp rank's tokens as in training.

    ``n_samples`` must be a multiple of ``micro_batch * dp_size`` so every rank runs
    the same number of forward passes (required under ZeRO-3). Each micro-batch is
    (tokens, labels), with ``with_ids`` also (position_ids, doc_ids).
    """
    idx = np.arange(dp_rank, n_samples, dp_size) % len(windows)
    batches = [windows.batch(idx[i : i + micro_batch], with_ids) for i in range(0, len(idx), micro_batch)]
    return [tuple(shard_sequence(t, cp_size, cp_rank) for t in b) for b in batches]
