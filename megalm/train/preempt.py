"""Preemption: a signal on any rank stops every rank at the same step, saved and requeued.

Schedulers warn before they kill: Slurm sends ``--signal=USR1@<seconds>`` (or
SIGTERM, then SIGKILL after ``KillWait``/``GraceTime``). Often only some ranks see
the signal first, so a rank must not simply stop: the others would block in the
next collective. Instead:

1. the handler only records the signal (async-signal-safe: no I/O, no collectives);
2. every optimizer step carries a 0/1 flag in the step's one health all-reduce (MAX,
   :mod:`megalm.train.health`), so every rank learns of a signal on any rank at the
   same step;
3. they save a checkpoint of that step (``megalm/train/checkpoint.py``: whole or
   invisible), under a watchdog that ends the process when the save would outlast
   ``preempt.grace_s`` counted from the signal, because the scheduler's SIGKILL
   is coming and must find ``latest`` pointing at a whole checkpoint;
4. rank 0 requeues the Slurm job (``scontrol requeue $SLURM_JOB_ID``) so it starts
   again and resumes with ``training.resume=auto``;
5. every rank exits with ``preempt.exit_code`` (75, EX_TEMPFAIL: run again to continue).

The flag costs nothing of its own: one slot of the health all-reduce.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import torch
import torch.distributed as dist

from megalm.config import ConfigError
from megalm.config.schema import PreemptConfig


def parse_signals(spec: str) -> list[signal.Signals]:
    """``"SIGUSR1,TERM"`` -> ``[SIGUSR1, SIGTERM]``.

    Raises:
        ConfigError: an unknown signal name.
    """
    out = []
    for name in filter(None, (s.strip().upper() for s in spec.split(","))):
        full = name if name.startswith("SIG") else f"SIG{name}"
        try:
            out.append(signal.Signals[full])
        except KeyError:
            raise ConfigError(f"preempt.signals: unknown signal '{name}' (e.g. SIGUSR1,SIGTERM)") from None
    return out


def requeue_slurm_job(env: dict[str, str] | os._Environ = os.environ) -> str:
    """Requeue the current Slurm batch job; returns what happened, for the log."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job: nothing to requeue"
    try:
        out = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed: {e}"
    if out.returncode:
        return f"scontrol requeue {job} failed ({out.returncode}): {out.stderr.strip()}"
    return f"requeued Slurm job {job}"


class Preemption:
    """Signal flag plus the collective stop protocol of the module docstring.

    Install early (before the slow model/engine build) and ``close()`` at the end.
    Every method that takes part in a collective must be called by all ranks.
    """

    def __init__(self, cfg: PreemptConfig) -> None:
        self.cfg = cfg
        self.signum: int | None = None
        self.t_signal = 0.0
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in parse_signals(cfg.signals):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.t_signal = signum, time.monotonic()

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def local_flag(self) -> float:
        """1.0 if this rank received a stop signal, else 0.0 (all-reduced MAX by the caller)."""
        return 0.0 if self.signum is None else 1.0

    def agree(self, any_rank: bool) -> bool:
        """Take the all-reduced flag: ``any_rank`` says some rank was signalled. Returns it."""
        if any_rank and self.signum is None and self.t_signal == 0.0:  # another rank's: start our clock
            self.t_signal = time.monotonic()
        return any_rank

    def seconds_left(self) -> float:
        """Collective: the grace budget left on the rank that was signalled first."""
        left = torch.tensor([self.cfg.grace_s - (time.monotonic() - self.t_signal)], dtype=torch.float64)
        dist.all_reduce(left, op=dist.ReduceOp.MIN)
        return left.item()

    def stop(self, step: int, save: Callable[[int], None], already_saved: bool) -> int:
        """Collective: save ``step`` inside the grace budget, requeue (rank 0), return the exit code.

        Args:
            step: the step every rank just finished.
            save: the trainer's collective checkpoint save.
            already_saved: a periodic save of ``step`` just happened; do not repeat it.
        """
        rank = dist.get_rank()
        name = signal.Signals(self.signum).name if self.signum else "a signal on another rank"
        left = self.seconds_left()
        _log(rank, f"preempt | {name}: stopping after step {step}, {left:.1f}s of grace left")
        if already_saved:
            _log(rank, f"preempt | step {step} is already saved")
        elif left <= 0:
            _log(rank, "preempt | grace budget spent before the save; the previous checkpoint stays latest")
        else:
            t0 = time.monotonic()
            watchdog = threading.Timer(left, self._grace_exceeded, args=(rank, left))
            watchdog.daemon = True
            watchdog.start()
            try:
                save(step)
            finally:
                watchdog.cancel()
            _log(rank, f"preempt | saved step {step} in {time.monotonic() - t0:.2f}s")
        self._requeue(rank)
        return self.cfg.exit_code

    def _requeue(self, rank: int) -> None:
        if rank == 0 and self.cfg.requeue:
            _log(rank, f"preempt | {requeue_slurm_job()}")
        _log(rank, f"preempt | exiting with code {self.cfg.exit_code}")

    def _grace_exceeded(self, rank: int, budget: float) -> None:
        """Watchdog: the save outlived the budget; leave before the scheduler's SIGKILL."""
        print(
            f"preempt | rank {rank}: save still running after the {budget:.1f}s grace budget; "
            "abandoning it (the previous checkpoint stays latest)",
            file=sys.stderr,
            flush=True,
        )
        self._requeue(rank)
        sys.stdout.flush()
        os._exit(self.cfg.exit_code)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)
