"""The pretraining loop: data -> step strategy -> metrics, evaluation, checkpoints.

Start-up order (every check that needs no process group fails before one exists):
discover ranks -> check the layout against the real world size -> open the data ->
start the process group -> build groups, model and engine. The loop then asks each
part whether it is due (``Progress``, ``Evaluator``, ``Checkpointer``: the "every N
steps" rules live with the part that owns them).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.config import Config, ConfigError, save_config
from megalm.data import Manifest, load_manifest, open_split, open_train_batches
from megalm.parallel import ParallelContext, ParallelDims
from megalm.parallel.layout import check_layout
from megalm.train.checkpoint import Checkpointer
from megalm.train.dist import discover_ranks, init_distributed
from megalm.train.engine import check_precision, gradient_accumulation, resolve_dtype
from megalm.train.evaluation import Evaluator, sample_text
from megalm.train.health import Health, NonFiniteError, Verdict, state_is_finite
from megalm.train.metrics import MetricsLog, check_tensorboard
from megalm.train.optim import apply_configured_lr
from megalm.train.pipeline import bubble_fraction, describe_partition
from megalm.train.plot import plot_loss
from megalm.train.preempt import Preemption
from megalm.train.progress import Progress
from megalm.train.rundir import RUN_DIR_ERRNOS, RunDirError, RunLock, describe_write_error
from megalm.train.stragglers import (
    StepClock,
    describe_comm_failure,
    find_stragglers,
    gather_hosts,
    gather_step_times,
    is_comm_failure,
)
from megalm.train.strategy import build_strategy


class CollectiveError(RuntimeError):
    """A collective failed (a rank died or hung past ``dist.timeout_s``): one ``error:`` line, exit 1."""


@dataclass
class TrainResult:
    """What a finished run reports back (rank 0 holds the full picture)."""

    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    sample: str = ""


def resolve_vocab(cfg: Config, manifest: Manifest) -> Config:
    """Fill ``model.vocab_size`` from the tokenizer (or check the configured one covers it)."""
    vocab = cfg.model.vocab_size or manifest.vocab_size
    if vocab < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({vocab}) is smaller than the tokenizer's "
            f"({manifest.vocab_size}); set model.vocab_size=0 to use the tokenizer's"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


class Trainer:
    """One training run. ``run()`` trains to ``training.max_steps`` and returns a result."""

    def __init__(self, cfg: Config) -> None:
        self.preempt = Preemption(cfg.preempt)  # first, so an early SIGUSR1 does not kill the rank
        ranks = discover_ranks()
        layout = check_layout(cfg, ranks.world_size, ranks.world_from)
        check_precision(cfg)
        check_tensorboard(cfg)
        dims = ParallelDims.from_world(ranks.world_size, layout.tp, layout.pp, layout.cp)
        where = dims.grid_coords(ranks.rank)
        manifest = load_manifest(cfg.data.dir, cfg.data)
        self.cfg = cfg = resolve_vocab(cfg, manifest)
        seq, d, t = cfg.model.seq_len, cfg.data, cfg.training
        self.batches = open_train_batches(
            d, manifest, seq, t.global_batch, t.micro_batch, where.dp, dims.dp, where.cp, dims.cp
        )
        self.val_windows = open_split(manifest, "val", seq, d.on_bad_data, d.verify)
        self.tokenizer_file, self.eos_id = manifest.tokenizer_file, manifest.eos_id

        self.info = info = init_distributed(cfg, ranks)
        self.batches.pin = info.device.type == "cuda"  # page-locked, for non-blocking copies
        self.run_dir = Path(cfg.run.dir)
        self.lock = self._lock_run_dir()  # before anything is written, on every rank's word
        self.hosts = gather_hosts()
        self.dims = dims
        self.ctx = ParallelContext(dims, timedelta(seconds=cfg.dist.timeout_s))
        self.dp_rank, self.dp = self.ctx.dp_rank, self.ctx.dp
        self.accum = gradient_accumulation(cfg, self.dp)
        torch.manual_seed(cfg.run.seed)
        self.health = Health(cfg, self.preempt, info.device)
        self.strategy = build_strategy(cfg, self.ctx, info, self.health)
        self.engine = self.strategy.engine
        self.clock = StepClock(self.accum)
        self._clock_warm = False
        self.phase = "start-up"
        if cfg.training.compile:
            self._log0(
                "compile | torch.compile (inductor, fullgraph) of each transformer block and the loss: "
                f"{self.strategy.compiled} modules on rank 0, compiled at first use"
            )
        if cfg.parallel.pp > 1:
            for line in describe_partition(self.strategy.module, self.ctx):
                self._log0(f"pipe   | {line}")
        layout_meta = {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero": cfg.zero.stage, "cp": dims.cp}
        self.checkpointer = Checkpointer(cfg, self.engine, self.batches, layout_meta, self.ctx)
        self.log: MetricsLog | None = None

    def _log0(self, msg: str) -> None:
        if self.info.rank == 0:
            print(msg, flush=True)

    def _lock_run_dir(self) -> RunLock | None:
        """Collective: rank 0 takes ``run.dir/.lock``; every rank raises the same
        :class:`RunDirError` if it cannot (in use, not writable)."""
        lock, problem = None, [""]
        if self.info.rank == 0:
            lock = RunLock(self.run_dir)
            try:
                lock.acquire()
            except RunDirError as e:
                problem[0] = str(e)
        dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise RunDirError(problem[0])
        return lock

    def _open_run_dir(self, start: int) -> None:
        """Rank 0: write the resolved config and open ``metrics.jsonl`` after ``start``."""
        if self.info.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.log = MetricsLog(self.run_dir, start if start else -1, self.cfg.run.tensorboard)

    def run(self) -> TrainResult:
        """Train from the resumed step (or 0) to ``training.max_steps``.

        Raises:
            NonFiniteError: a step the health policy stops on (exit 2).
            CollectiveError: a collective failed; names the missing ranks and hosts.
            RunDirError: the run directory could not be written (exit 2).
        """
        try:
            return self._run()
        except RuntimeError as e:
            if not is_comm_failure(e):
                raise
            where = f"{self.phase} (dist.timeout_s={self.cfg.dist.timeout_s})"
            raise CollectiveError(describe_comm_failure(e, where, self.dims, self.hosts)) from None
        except OSError as e:  # a write under run.dir (metrics, config) on a full or read-only disk
            if e.errno not in RUN_DIR_ERRNOS:
                raise
            raise RunDirError(describe_write_error(Path(e.filename or self.run_dir), e)) from None
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> TrainResult:
        t = self.cfg.training
        start = self.checkpointer.resume()
        progress, evaluator = self._start(start)
        result = TrainResult(self.run_dir, start)
        if start == 0:
            result.initial_val_loss = evaluator.run(0)
        step = start
        while step < t.max_steps:
            step += 1
            last = step == t.max_steps
            lr = self.engine.get_lr()[0]
            out, verdict = self._train_step(step)
            progress.add(out)
            if not verdict.applied:
                restored = self._not_applied(step, verdict)
                if restored != step:  # rolled back: the loop goes on after the restored step
                    step = restored
                    continue
            times = self._gather_rank_work(progress, step, last)
            record = progress.maybe_log(step, lr, self.batches.epoch, last, times, self._name_stragglers)
            if record is not None:
                result.losses[step] = record["loss"]
            with progress.excluded():
                self.phase = f"evaluation or checkpoint at step {step}"
                evaluator.maybe_run(step, last)
                if self.checkpointer.due(step, last):
                    self._save(step, wait=last or not t.async_save)
            result.step = step
            if not last and verdict.stop_signal:  # agreed in the step's health all-reduce
                self.checkpointer.finish()
                self._close()
                saved = self.checkpointer.due(step, last) and not verdict.nonfinite
                raise SystemExit(self.preempt.stop(step, self._save, saved))
        self.preempt.close()
        if evaluator.last_step != result.step:
            evaluator.run(result.step)
        result.final_val_loss = evaluator.last_loss
        result.sample = self._sample()
        self._close(result)
        return result

    def _start(self, start: int) -> tuple[Progress, Evaluator]:
        """After the resume: restore the health counters and LR, open the run directory, print
        the header; the progress meter and the evaluator of this run."""
        cfg = self.cfg
        if self.checkpointer.meta:
            self.health.load_state_dict(self.checkpointer.meta.get("health", {}))
            apply_configured_lr(self.engine.lr_scheduler, cfg.optim)
        self._open_run_dir(start)
        self.extra = {
            "pipeline_bubble": bubble_fraction(cfg.parallel.pp, self.accum),
            "skipped_steps": self.health.skipped,
            "rank_work_s_median": None,  # from the second log interval on (see _log_stragglers)
            "rank_work_s_max": None,
            "stragglers": [],
        }
        progress = Progress(cfg, self.info.device, self.info.world_size, self.log, self.extra, start)
        if self.log is not None:
            val = len(self.val_windows) if self.val_windows else 0
            data = f"{len(self.batches.sources[0])} train windows, {val} held-out"
            dtype = resolve_dtype(cfg, self.info.device)
            header = progress.header(self.info.launcher, self.info.backend, dtype, self.dp, self.accum, data)
            print(header, flush=True)
        evaluator = Evaluator(cfg, self.strategy, self.val_windows, self.ctx, self.log)
        return progress, evaluator

    def _train_step(self, step: int):
        """One optimizer step (health-checked inside); the step's own work is clocked."""
        self.phase = f"training step {step}"
        t0 = time.perf_counter()
        micro_batches = self.batches.step_batches()
        t1 = time.perf_counter()
        out = self.strategy.train_step(micro_batches, self.clock)
        self.clock.end_step(t1 - t0, time.perf_counter() - t1)
        return out, self.health.verdict

    def _not_applied(self, step: int, v: Verdict) -> int:
        """A step the health check did not apply: record it, then stop, roll back or go on.
        Returns the step training continues after (``step`` unless rolled back)."""
        h = self.health
        self._log0(
            f"health | step {step} not applied: {v.reason} ({h.skipped} skipped of "
            f"training.max_skipped_steps={self.cfg.training.max_skipped_steps}"
            f"{f', {h.scaler_skips} by the fp16 loss scaler' if h.scaler_skips else ''})"
        )
        self.extra["skipped_steps"] = h.skipped
        if self.log is not None:
            self.log.write({"step": step, "event": v.action, "reason": v.reason, **h.state_dict()})
        if v.action == "stop":
            self._close()
            raise NonFiniteError(self._stop_message(step, v))
        if v.action == "rollback":
            return self._rollback(step)
        return step

    def _stop_message(self, step: int, v: Verdict) -> str:
        latest = self.checkpointer.latest_tag()
        where = (
            f"the newest checkpoint, {latest} in {self.checkpointer.dir}, holds finite weights"
            if latest
            else "no checkpoint was written yet"
        )
        key = "on_nonfinite" if v.nonfinite else "on_spike"
        return (
            f"step {step} not applied: {v.reason} (training.{key}={getattr(self.cfg.training, key)}); "
            f"{where}: lower optim.lr (it applies on resume), raise optim.warmup_steps or use "
            "precision.dtype=fp32, then resume with training.resume=auto (or from an older tag: "
            "training.resume=<tag directory>)"
        )

    def _rollback(self, step: int) -> int:
        """Collective: reload the newest checkpoint and skip the batches since it (data not replayed)."""
        position = self.batches.state_dict()
        restored = self.checkpointer.load_latest()
        if restored is None:
            self._log0(f"health | no checkpoint to roll back to: step {step} is skipped instead")
            return step
        self.batches.load_state_dict(position)
        apply_configured_lr(self.engine.lr_scheduler, self.cfg.optim)
        self.health.rollbacks += 1
        self._log0(
            f"health | rolled back to step {restored}; the batches of steps {restored + 1}..{step} skipped"
        )
        return restored

    def _gather_rank_work(self, progress: Progress, step: int, last: bool) -> torch.Tensor | None:
        """Collective at log steps: every rank's own work per step (read by the log step)."""
        if not progress.due(step, last):
            return None
        if not self._clock_warm:  # the first interval after a start holds one-off work (allocation, caches)
            self._clock_warm = True
            self.clock.take()
            return None
        return gather_step_times(self.clock.take(), self.info.device)

    def _name_stragglers(self, times: list[float]) -> None:
        """Name ranks whose own work per step exceeds ``dist.straggler_factor`` x the median."""
        factor = self.cfg.dist.straggler_factor
        slow = find_stragglers(times, factor, self.hosts)
        self.extra.update(
            rank_work_s_median=statistics.median(times), rank_work_s_max=max(times), stragglers=slow
        )
        for s in slow:
            self._log0(
                f"straggler | rank {s['rank']} (host {s['host']}): {s['step_time_s']:.3f}s of own work "
                f"per step, {s['x_median']:.1f}x the median (dist.straggler_factor={factor:g})"
            )

    def _save(self, step: int, wait: bool = True) -> None:
        """Collective: write tag ``step``, never from a non-finite state; a write failure is one line.
        ``wait=False``: the files are written in the background (``training.async_save``)."""
        v = self.health.verdict
        if v.nonfinite:
            self._log0(f"checkpoint | not saving step {step}: it was not applied ({v.reason}); latest stays")
            return
        if not state_is_finite(self.engine, self.info.device):
            self._close()
            raise NonFiniteError(
                f"refusing to save step {step}: parameters or optimizer states hold NaN/inf; "
                f"the last checkpoint in {self.checkpointer.dir} stays latest: lower optim.lr, "
                "then resume with training.resume=auto"
            )
        self.checkpointer.extra["health"] = self.health.state_dict()
        try:
            self.checkpointer.save(step, wait=wait)
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and is_comm_failure(e):
                raise
            path = self.checkpointer.dir
            raise RunDirError(f"checkpoint of step {step}: {describe_write_error(path, e)}") from None

    def _sample(self) -> str:
        if self.cfg.training.sample_tokens <= 0:
            return ""
        return sample_text(self.cfg, self.strategy, self.tokenizer_file, self.eos_id, self.info.device)

    def _close(self, result: TrainResult | None = None) -> None:
        if self.log is None:
            return
        self.log.close()
        if result is None:
            return
        plot_loss(self.log.path, self.run_dir / "loss.png")
        if result.initial_val_loss is not None and result.final_val_loss is not None:
            print(
                f"held-out loss {result.initial_val_loss:.4f} -> {result.final_val_loss:.4f} "
                f"({result.initial_val_loss - result.final_val_loss:.2f} nats better)",
                flush=True,
            )
        print(f"wrote {self.run_dir}/metrics.jsonl, loss.png, checkpoints/", flush=True)
        if result.sample:
            print(f"--- sample ---\n{result.sample}\n--------------", flush=True)


def pretrain(cfg: Config) -> TrainResult:
    """Train ``cfg`` to ``training.max_steps``; the entry point behind ``launch/pretrain.py``.

    The process group is torn down however the run ends (an error after start-up otherwise
    may leave the backend's threads to abort the interpreter at exit: "terminate called
    without an active exception", SIGABRT), except after a failed collective, where
    tearing down could wait on the dead peer.
    """
    broken = False
    try:
        return Trainer(cfg).run()
    except CollectiveError:
        broken = True
        raise
    finally:
        if dist.is_initialized() and not broken:
            dist.destroy_process_group()
