"""Which rank holds the job up: slow ranks every log interval, missing ranks when a collective fails.

Slow ranks. In a synchronous job every rank's wall time per step is the same (they
wait for each other in the gradient reduction), so what is compared is each rank's own
work: waiting for its batches, its forward passes and the backward passes before the
accumulation boundary (:class:`StepClock`; for ZeRO 0/1 these hold no data-parallel
communication; under a pipeline the whole ``train_batch`` counts, neighbours' waits
included). Every log interval one all-gather of one float per rank; a rank slower than
``dist.straggler_factor`` x the median is named with its host in the log and in
``metrics.jsonl`` (``stragglers``), so a slow GPU, node or data path shows up before it
becomes a timeout.

Missing ranks. When a collective fails (``dist.timeout_s`` passed, or a peer's
connection closed), each surviving rank writes "I am here" into the rendezvous store
(the ``env://`` key-value store every rank already talks to), waits a few seconds and
names the ranks that did not: dead or hung, with their hosts. If the store itself does
not answer, its host (rank 0's, or torchrun's agent) is the one gone.
"""

from __future__ import annotations

import contextlib
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

STORE_PREFIX = "megalm/failed"
WAIT_S = 5.0  # how long survivors of a failed collective wait for each other's "I am here"


class StepClock:
    """A :class:`megalm.train.step.PhaseTimer` that adds up this rank's own work per step.

    Counts ``forward`` phases and the ``backward`` phases of every micro-batch but the
    last of each step (the last one's backward waits for the gradient reduction).
    """

    def __init__(self, accum: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.accum, self.clock = accum, clock
        self.busy = 0.0
        self.steps = 0
        self._backwards = 0
        self._phased = False

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        yield
        dt = self.clock() - t0
        if name == "forward":
            self.busy += dt
            self._phased = True
        elif name == "backward":
            self._backwards += 1
            if self._backwards % self.accum:
                self.busy += dt

    def end_step(self, data_s: float, step_s: float) -> None:
        """Close a step: ``data_s`` waiting for batches; ``step_s`` the whole step, counted
        when the strategy reported no phases (the pipeline)."""
        self.busy += data_s + (0.0 if self._phased else step_s)
        self.steps += 1
        self._phased = False

    def take(self) -> float:
        """Mean seconds of own work per step since the last call."""
        mean = self.busy / max(self.steps, 1)
        self.busy, self.steps = 0.0, 0
        return mean


def gather_hosts() -> list[str]:
    """Collective (once, at start-up): every rank's host name, by rank."""
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return [str(h) for h in hosts]


def find_stragglers(times: list[float], factor: float, hosts: list[str]) -> list[dict[str, Any]]:
    """Ranks whose ``times`` exceed ``factor`` x the median (none when ``factor`` is 0)."""
    median = statistics.median(times) if times else 0.0
    if factor <= 0 or median <= 0:
        return []
    return [
        {"rank": r, "host": hosts[r], "step_time_s": round(t, 6), "x_median": round(t / median, 2)}
        for r, t in enumerate(times)
        if t > factor * median
    ]


def gather_step_times(seconds: float, device: torch.device) -> torch.Tensor:
    """Collective: every rank's ``seconds``, by rank, as a (world,) fp64 tensor on ``device``
    (one all-gather of one float each; not read here: the log step reads it together with
    the loss, :meth:`megalm.train.progress.Progress.maybe_log`)."""
    mine = torch.tensor([seconds], dtype=torch.float64, device=device)
    out = torch.empty(dist.get_world_size(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(out, mine)
    return out


def missing_ranks(rank: int, world: int, wait_s: float) -> list[int] | None:
    """After a failed collective: the ranks that do not say "I am here" within ``wait_s``
    through the rendezvous store, or ``None`` if the store does not answer."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(wait_s, 1.0)))
        store.set(f"{STORE_PREFIX}/{rank}", socket.gethostname())
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([f"{STORE_PREFIX}/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store's host is gone, or the group was never started
        return None


def describe_missing(missing: list[int] | None, hosts: list[str]) -> str:
    """The sentence naming who is gone, for the error line."""

    def name(r: int) -> str:
        return f"rank {r} (host {hosts[r]})" if r < len(hosts) else f"rank {r}"

    if missing is None:
        return f"the rendezvous store does not answer either: {name(0)} (its host) or the launcher is gone"
    if not missing:
        return (
            "every rank answered: one was slower than dist.timeout_s (raise it), "
            "or the ranks called collectives in different orders"
        )
    who = ", ".join(name(r) for r in missing)
    return f"{who} did not answer within {WAIT_S:g}s: dead or hung (look at its log and its host)"


def is_comm_failure(e: BaseException) -> bool:
    """A torch.distributed failure: a peer died, hung past the timeout, or closed its connection."""
    if isinstance(e, dist.DistError):
        return True
    return any(s in str(e) for s in ("Timed out", "timed out", "Connection closed", "Connection reset"))


def describe_comm_failure(e: BaseException, where: str, dims, hosts: list[str]) -> str:
    """The error line after a failed collective: which of this rank's groups lost which rank on
    which host (:func:`missing_ranks`, waiting up to ``WAIT_S``), and the backend's own first line.

    Args:
        where: what the trainer was doing ("training step 13 (dist.timeout_s=20)").
        dims: the run's :class:`megalm.parallel.ParallelDims` (its groups name the one broken).
        hosts: every rank's host (:func:`gather_hosts`).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    missing = missing_ranks(rank, world, wait_s=WAIT_S)
    groups = {
        "tensor-parallel": dims.tp_groups(),
        "context-parallel": dims.cp_groups(),
        "data-parallel": dims.dp_groups(),
        "pipeline": dims.pp_groups(),
    }
    shared = [
        f"the {name} group {g}"
        for name, gs in groups.items()
        for g in gs
        if rank in g and any(m in g for m in missing or []) and len(g) > 1
    ]
    group = ", ".join(shared) or f"the world group (ranks 0..{world - 1})"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"^\[[^\]]*\.cc:\d+\] ", "", first).split(". This is typically")[0][
        :300
    ]  # gloo's source path
    return (
        f"rank {rank}: a collective of {where} failed in {group}: {first}; {describe_missing(missing, hosts)}"
    )
