"""The pretraining loop: data -> step strategy -> metrics, evaluation, checkpoints.

Start-up order (every check that needs no process group fails before one exists):
discover ranks -> check the layout against the real world size -> open the data ->
start the process group -> build groups, model and engine. The loop then asks each
part whether it is due (``Progress``, ``Evaluator``, ``Checkpointer``: the "every N
steps" rules live with the part that owns them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from megalm.config import Config, ConfigError, save_config
from megalm.data import Manifest, load_manifest, open_split, open_train_batches
from megalm.parallel import ParallelContext, ParallelDims
from megalm.parallel.layout import check_layout
from megalm.train.checkpoint import Checkpointer
from megalm.train.dist import discover_ranks, init_distributed
from megalm.train.engine import gradient_accumulation, resolve_dtype
from megalm.train.evaluation import Evaluator, sample_text
from megalm.train.metrics import MetricsLog
from megalm.train.pipeline import bubble_fraction, describe_partition
from megalm.train.plot import plot_loss
from megalm.train.preempt import Preemption
from megalm.train.progress import Progress
from megalm.train.strategy import build_strategy


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
        dims = ParallelDims.from_world(ranks.world_size, layout.tp, layout.pp, layout.cp)
        where = dims.grid_coords(ranks.rank)
        manifest = load_manifest(cfg.data.dir, cfg.data)
        self.cfg = cfg = resolve_vocab(cfg, manifest)
        seq, d, t = cfg.model.seq_len, cfg.data, cfg.training
        self.batches = open_train_batches(
            d, manifest, seq, t.global_batch, t.micro_batch, where.dp, dims.dp, where.cp, dims.cp
        )
        self.val_windows = open_split(manifest, "val", seq, d.on_bad_data, d.verify)
        self.tokenizer_file = manifest.tokenizer_file

        self.info = info = init_distributed(cfg, ranks)
        self.ctx = ParallelContext(dims, timedelta(seconds=cfg.dist.timeout_s))
        self.dp_rank, self.dp = self.ctx.dp_rank, self.ctx.dp
        self.run_dir = Path(cfg.run.dir)
        self.accum = gradient_accumulation(cfg, self.dp)
        torch.manual_seed(cfg.run.seed)
        self.strategy = build_strategy(cfg, self.ctx, info)
        self.engine = self.strategy.engine
        if cfg.parallel.pp > 1:
            for line in describe_partition(self.strategy.module, self.ctx):
                self._log0(f"pipe   | {line}")
        layout_meta = {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero": cfg.zero.stage, "cp": dims.cp}
        self.checkpointer = Checkpointer(cfg, self.engine, self.batches, layout_meta, self.ctx)
        self.log: MetricsLog | None = None

    def _log0(self, msg: str) -> None:
        if self.info.rank == 0:
            print(msg, flush=True)

    def _open_run_dir(self, start: int) -> None:
        """Rank 0: write the resolved config and open ``metrics.jsonl`` after ``start``."""
        if self.info.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.log = MetricsLog(self.run_dir, start if start else -1)

    def run(self) -> TrainResult:
        """Train from the resumed step (or 0) to ``training.max_steps``."""
        cfg, t = self.cfg, self.cfg.training
        start = self.checkpointer.resume()
        self._open_run_dir(start)
        bubble = bubble_fraction(cfg.parallel.pp, self.accum)
        extra = {"pipeline_bubble": bubble}
        progress = Progress(cfg, self.info.device, self.info.world_size, self.log, extra, start)
        if self.log is not None:
            val = len(self.val_windows) if self.val_windows else 0
            data = f"{len(self.batches.sources[0])} train windows, {val} held-out"
            dtype = resolve_dtype(cfg, self.info.device)
            header = progress.header(self.info.launcher, self.info.backend, dtype, self.dp, self.accum, data)
            print(header, flush=True)
        evaluator = Evaluator(cfg, self.strategy, self.val_windows, self.ctx, self.log)
        result = TrainResult(self.run_dir, start)
        if start == 0:
            result.initial_val_loss = evaluator.run(0)
        for step in range(start + 1, t.max_steps + 1):
            last = step == t.max_steps
            lr = self.engine.get_lr()[0]
            out = self.strategy.train_step(self.batches.step_batches())
            self._check_finite(out.loss, step)
            progress.add(out)
            record = progress.maybe_log(step, lr, self.batches.epoch, last)
            if record is not None:
                result.losses[step] = record["loss"]
            with progress.excluded():
                evaluator.maybe_run(step, last)
                self.checkpointer.maybe_save(step, last)
            result.step = step
            if not last and self.preempt.should_stop():  # collective: same step on every rank
                self.checkpointer.finish()
                self._close()
                raise SystemExit(self.preempt.stop(step, self.checkpointer.save, self.checkpointer.due(step)))
        self.preempt.close()
        if evaluator.last_step != result.step:
            evaluator.run(result.step)
        result.final_val_loss = evaluator.last_loss
        result.sample = self._sample()
        self._close(result)
        return result

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step}; the last checkpoint in {self.run_dir}/checkpoints "
                "is intact: lower optim.lr, raise optim.warmup_steps or use precision.dtype=fp32, "
                "then resume with training.resume=auto"
            )

    def _sample(self) -> str:
        if self.cfg.training.sample_tokens <= 0:
            return ""
        if self.strategy.logits is None:
            self._log0("sample | skipped: sampling from a pipeline-parallel model is not implemented")
            return ""
        return sample_text(self.cfg, self.strategy, self.tokenizer_file, self.info.device)

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
    """Train ``cfg`` to ``training.max_steps``; the entry point behind ``launch/pretrain.py``."""
    return Trainer(cfg).run()
