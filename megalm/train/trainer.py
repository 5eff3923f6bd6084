"""The pretraining loop: data -> DeepSpeed engine -> metrics, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.config import Config, ConfigError, save_config, to_dict
from megalm.data import Manifest, eval_batches, load_manifest, open_split, open_train_batches
from megalm.model import GPT, flops_per_token, generate, param_count
from megalm.parallel import ParallelContext, ParallelDims
from megalm.parallel.validate import validate_layout
from megalm.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
from megalm.train.dist import DistInfo, init_distributed
from megalm.train.engine import build_engine, gradient_accumulation, resolve_dtype
from megalm.train.metrics import MetricsLog, memory_gb, peak_flops
from megalm.train.pipeline import (
    bubble_fraction,
    build_pipeline,
    describe_partition,
    pipeline_eval_loss,
    pipeline_train_step,
)
from megalm.train.plot import plot_loss
from megalm.train.preempt import Preemption
from megalm.train.step import engine_step


@dataclass
class TrainResult:
    """What a finished run reports back (rank 0 holds the full picture)."""

    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    sample: str = ""


def check_config(cfg: Config, world_size: int) -> None:
    """Layout checks that need only the config and the world size.

    Raises:
        ConfigError: with every factor named.
    """
    p = cfg.parallel
    if p.pp > 1 and cfg.zero.stage > 1:
        raise ConfigError(
            f"zero.stage={cfg.zero.stage} with parallel.pp={p.pp}: DeepSpeed's pipeline engine supports "
            "ZeRO-1 only (stages 2/3 shard gradients that the pipeline accumulates across micro-batches); "
            "use zero.stage=1 with pipeline parallelism, or parallel.pp=1 with ZeRO-2/3"
        )
    if p.pp > cfg.model.n_layers:
        raise ConfigError(
            f"parallel.pp ({p.pp}) is larger than model.n_layers ({cfg.model.n_layers}): every pipeline "
            "stage needs at least one transformer block"
        )
    dims = validate_layout(cfg.model, p, world_size)
    try:
        gradient_accumulation(cfg, dims.dp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in (
        "max_steps",
        "global_batch",
        "micro_batch",
        "log_interval",
        "eval_batches",
        "save_interval",
    ):
        if getattr(cfg.training, key) <= 0:
            raise ConfigError(f"training.{key} must be > 0, got {getattr(cfg.training, key)}")


def resolve_vocab(cfg: Config, manifest: Manifest) -> Config:
    """Fill ``model.vocab_size`` from the tokenizer (or check the configured one covers it)."""
    vocab = cfg.model.vocab_size or manifest.vocab_size
    if vocab < manifest.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({vocab}) is smaller than the tokenizer's "
            f"({manifest.vocab_size}); set model.vocab_size=0 to use the tokenizer's"
        )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _dp_mean(x: torch.Tensor, dp: int, group) -> float:
    """Mean over data-parallel ranks (TP peers already hold the same value)."""
    x = x.detach().float().clone()
    dist.all_reduce(x, group=group)
    return x.item() / dp


def _log0(info: DistInfo, msg: str) -> None:
    if info.rank == 0:
        print(msg, flush=True)


class Trainer:
    """One training run. ``run()`` trains to ``training.max_steps`` and returns a result."""

    def __init__(self, cfg: Config) -> None:
        # Everything that can be checked without a process group fails here, fast.
        check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.preempt = Preemption(cfg.preempt)  # first, so an early SIGUSR1 does not kill the rank
        manifest = load_manifest(cfg.data.dir)
        self.cfg = resolve_vocab(cfg, manifest)
        self.info = info = init_distributed(self.cfg)
        p = self.cfg.parallel
        self.ctx = ParallelContext(
            ParallelDims.from_world(info.world_size, p.tp, p.pp), timedelta(seconds=self.cfg.dist.timeout_s)
        )
        self.dp_rank, self.dp = self.ctx.dp_rank, self.ctx.dp
        self.run_dir = Path(self.cfg.run.dir)
        seq, d, t = self.cfg.model.seq_len, self.cfg.data, self.cfg.training
        self.batches = open_train_batches(
            d, manifest, seq, t.global_batch, t.micro_batch, self.dp_rank, self.dp
        )
        self.train_windows = self.batches.sources[0]
        self.val_windows = open_split(manifest, "val", seq, d.on_bad_data, d.verify)
        self.tokenizer_file = manifest.tokenizer_file
        torch.manual_seed(self.cfg.run.seed)
        self.pipelined = p.pp > 1
        if self.pipelined:
            self.model = build_pipeline(self.cfg, self.ctx, init_seed=self.cfg.run.seed)
            self.engine = build_engine(self.cfg, self.model, self.dp, info.device)
            for line in describe_partition(self.model, self.ctx):
                _log0(info, f"pipe   | {line}")
        else:
            self.model = GPT(self.cfg.model, self.ctx.tp_group, p.sequence_parallel, self.cfg.run.seed)
            if t.recompute == "full":
                self.model.set_recompute(t.recompute_interval)
            self.engine = build_engine(self.cfg, self.model, self.dp, info.device, self.ctx.as_mpu())
        self.flops_per_token = flops_per_token(self.cfg.model)
        self._plain_fp32 = self.cfg.zero.stage == 0 and resolve_dtype(self.cfg, info.device) == "fp32"
        self.peak, self.peak_source = peak_flops(info.device) if info.rank == 0 else (1.0, "")

    # -- pieces -------------------------------------------------------------------------
    def _resume(self) -> int:
        how = self.cfg.training.resume
        ckpt_dir = self.run_dir / "checkpoints"
        if how == "never":
            return 0
        path = find_latest(ckpt_dir) if how == "auto" else Path(how)
        if path is None:
            return 0
        meta = load_checkpoint(self.engine, path, self._layout())
        self.batches.load_state_dict(meta["data"])
        _log0(self.info, f"resumed from {path} at step {meta['step']}")
        return int(meta["step"])

    def _layout(self) -> dict[str, int]:
        return {"tp": self.ctx.tp, "pp": self.ctx.dims.pp, "dp": self.dp, "zero": self.cfg.zero.stage}

    def _save(self, step: int) -> None:
        meta = {
            "step": step,
            "data": self.batches.state_dict(),
            "world_size": self.info.world_size,
            "layout": self._layout(),
            "config": to_dict(self.cfg),
        }
        t0 = time.perf_counter()
        path = save_checkpoint(
            self.engine,
            self.run_dir / "checkpoints",
            step,
            meta,
            self.cfg.training.keep_checkpoints,
        )
        _log0(self.info, f"saved {path} in {time.perf_counter() - t0:.1f}s")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean held-out loss over ``eval_batches * global_batch`` fixed windows."""
        if self.val_windows is None:
            return None
        t = self.cfg.training
        n = t.eval_batches * t.global_batch
        batches = eval_batches(self.val_windows, n, t.micro_batch, self.dp_rank, self.dp)
        if self.pipelined:
            return pipeline_eval_loss(self.engine, batches, gradient_accumulation(self.cfg, self.dp))
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64)
        for x, y in batches:
            loss = self.engine(x.to(self.info.device), y.to(self.info.device))
            total += loss.double().cpu() * x.size(0)
        self.engine.train()
        dist.all_reduce(total, group=self.ctx.dp_group)
        return total.item() / n

    @torch.no_grad()
    def sample(self) -> str:
        """A short continuation of ``training.sample_prompt`` (all ranks run it; ZeRO-3 safe)."""
        from tokenizers import Tokenizer

        t = self.cfg.training
        tok = Tokenizer.from_file(str(self.tokenizer_file))
        prompt = torch.tensor([tok.encode(t.sample_prompt).ids or [0]], device=self.info.device)
        gen = torch.Generator(self.info.device).manual_seed(self.cfg.run.seed)
        self.engine.eval()
        out = generate(
            self.engine.module,
            prompt,
            t.sample_tokens,
            self.cfg.model.seq_len,
            t.sample_temperature,
            t.sample_top_k,
            gen,
        )
        self.engine.train()
        return tok.decode(out[0].tolist())

    def _train_step(self) -> tuple[float, float | None]:
        if self.pipelined:
            loss = pipeline_train_step(self.engine, self.batches.step_batches())
            gnorm = self.engine.get_global_grad_norm()
            return loss, (float(gnorm) if gnorm is not None else None)
        loss, gnorm = engine_step(
            self.engine, self.batches.step_batches(), self.info.device, self._plain_fp32, self.ctx.as_mpu()
        )
        return _dp_mean(loss, self.dp, self.ctx.dp_group), gnorm

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, info, t = self.cfg, self.info, self.cfg.training
        start = self._resume()
        result = TrainResult(self.run_dir, start)
        log = None
        if info.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            log = MetricsLog(self.run_dir, start if start else -1)
            self._print_header(start)
        if start == 0:
            result.initial_val_loss = self.evaluate()
            if log and result.initial_val_loss is not None:
                log.write({"step": 0, "val_loss": result.initial_val_loss})
                print(f"step     0 | held-out loss {result.initial_val_loss:.4f}", flush=True)
        tokens_per_step = t.global_batch * cfg.model.seq_len
        t_run, t_interval, steps_interval, last_val_step = time.perf_counter(), 0.0, 0, 0
        for step in range(start + 1, t.max_steps + 1):
            lr = self.engine.get_lr()[0]
            t0 = time.perf_counter()
            loss, gnorm = self._train_step()
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            t_interval += time.perf_counter() - t0
            steps_interval += 1
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {step}; the last checkpoint in {self.run_dir}/checkpoints "
                    "is intact: lower optim.lr, raise optim.warmup_steps or use precision.dtype=fp32, "
                    "then resume with training.resume=auto"
                )
            result.losses[step] = loss
            if step % t.log_interval == 0 or step == t.max_steps:
                record = self._record(
                    step,
                    loss,
                    lr,
                    gnorm,
                    tokens_per_step,
                    steps_interval,
                    t_interval,
                    time.perf_counter() - t_run,
                )
                t_interval, steps_interval = 0.0, 0
                if log:
                    log.write(record)
                    self._print_progress(record, start)
            if step % t.eval_interval == 0 or step == t.max_steps:
                val = self.evaluate()
                last_val_step = step
                if log and val is not None:
                    log.write({"step": step, "val_loss": val})
                    print(f"step {step:>5} | held-out loss {val:.4f}", flush=True)
                result.final_val_loss = val
            if step % t.save_interval == 0 or step == t.max_steps:
                self._save(step)
            result.step = step
            if step < t.max_steps and self.preempt.should_stop():  # collective: same step on every rank
                if log:
                    log.close()
                raise SystemExit(self.preempt.stop(step, self._save, step % t.save_interval == 0))
        self.preempt.close()
        if last_val_step != result.step:
            result.final_val_loss = self.evaluate()
        if t.sample_tokens > 0 and self.pipelined:
            _log0(info, "sample | skipped: sampling from a pipeline-parallel model is not implemented")
        elif t.sample_tokens > 0:
            result.sample = self.sample()
        if log:
            log.close()
            plot_loss(log.path, self.run_dir / "loss.png")
            self._print_footer(result)
        return result

    # -- output ------------------------------------------------------------------------
    def _record(self, step, loss, lr, gnorm, tokens_per_step, steps, seconds, elapsed) -> dict:
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / self.info.world_size / 1e12
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": gnorm,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak,
            "mem_gb": memory_gb(self.info.device),
            "step_time_s": seconds / steps,
            "pipeline_bubble": bubble_fraction(self.ctx.dims.pp, gradient_accumulation(self.cfg, self.dp)),
            "elapsed_s": elapsed,
            "epoch": self.batches.epoch,
        }

    def _print_header(self, start: int) -> None:
        cfg, info = self.cfg, self.info
        m = cfg.model
        print(
            f"megalm | launcher {info.launcher} | world {info.world_size} ({info.backend}, "
            f"{info.device}) | tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp {self.dp}"
            f"{' (sequence parallel)' if cfg.parallel.sequence_parallel else ''} | zero {cfg.zero.stage} | "
            f"pipeline bubble (pp-1)/(m+pp-1) = "
            f"{bubble_fraction(cfg.parallel.pp, gradient_accumulation(cfg, self.dp)):.2f} | "
            f"{resolve_dtype(cfg, info.device)}\n"
            f"model  | {m.family} L={m.n_layers} d={m.d_model} heads={m.n_heads}/"
            f"{m.n_kv_heads or m.n_heads} T={m.seq_len} V={m.vocab_size} | "
            f"{param_count(m, cfg.parallel.tp) / 1e6:.2f}M params\n"
            f"data   | {len(self.train_windows)} train windows, "
            f"{len(self.val_windows) if self.val_windows else 0} held-out | global batch "
            f"{cfg.training.global_batch} = micro {cfg.training.micro_batch} x accum "
            f"{gradient_accumulation(cfg, self.dp)} x dp {self.dp}\n"
            f"MFU    | model FLOPs/token = 6*N_mm + 12*L*T*d = {self.flops_per_token:.3e} "
            f"(non-causal, no recompute); peak {self.peak / 1e12:.3f} TFLOP/s ({self.peak_source})\n"
            f"run    | {self.run_dir} | steps {start + 1}..{cfg.training.max_steps}",
            flush=True,
        )

    def _print_progress(self, r: dict, start: int) -> None:
        done = r["step"] - start
        eta = r["elapsed_s"] / max(done, 1) * (self.cfg.training.max_steps - r["step"])
        gnorm = f"{r['grad_norm']:.3f}" if r["grad_norm"] is not None else "n/a"
        print(
            f"step {r['step']:>5}/{self.cfg.training.max_steps} | loss {r['loss']:.4f} | "
            f"lr {r['lr']:.2e} | gnorm {gnorm} | {r['tokens_per_s']:,.0f} tok/s | "
            f"{r['tflops_per_device']:.4f} TFLOP/s/dev | MFU {r['mfu']:.1%} | "
            f"mem {r['mem_gb']:.2f} GB | ETA {eta:.0f}s",
            flush=True,
        )

    def _print_footer(self, r: TrainResult) -> None:
        if r.initial_val_loss is not None and r.final_val_loss is not None:
            print(
                f"held-out loss {r.initial_val_loss:.4f} -> {r.final_val_loss:.4f} "
                f"({r.initial_val_loss - r.final_val_loss:.2f} nats better)",
                flush=True,
            )
        print(f"wrote {self.run_dir}/metrics.jsonl, loss.png, checkpoints/", flush=True)
        if r.sample:
            print(f"--- sample ---\n{r.sample}\n--------------", flush=True)


def pretrain(cfg: Config) -> TrainResult:
    """Train ``cfg`` to ``training.max_steps``; the entry point behind ``launch/pretrain.py``."""
    return Trainer(cfg).run()
