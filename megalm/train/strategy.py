"""How one optimizer step runs: chosen once at start-up, plain (pp = 1) or pipelined (pp > 1).

Both strategies build the model and the DeepSpeed engine and answer the same three
questions for the trainer, so the trainer never asks "is this pipelined?":

- ``train_step(micro_batches, timer)``: one optimizer step; the data-parallel mean
  loss and the gradient norm stay on the device (read at log time);
- ``eval_loss(micro_batches)``: mean held-out loss over every rank's windows;
- ``logits``: a ``tokens -> logits`` function for sampling, or ``None``.

``timer`` is the timing hook the benchmark uses (``megalm/perf``): the plain step
reports ``forward``, ``backward`` and ``optimizer`` phases through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.model import GPT
from megalm.parallel import ParallelContext
from megalm.parallel.context import gather_sequence, shard_sequence
from megalm.train.dist import DistInfo
from megalm.train.engine import build_engine, gradient_accumulation, resolve_dtype
from megalm.train.pipeline import (
    build_pipeline,
    build_pipeline_engine,
    pipeline_eval_loss,
    pipeline_grad_norm,
    pipeline_train_step,
)
from megalm.train.step import PhaseTimer, engine_step

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


class StepOutput(NamedTuple):
    """One optimizer step's numbers, as 0-d fp32 tensors on the training device."""

    loss: torch.Tensor  # mean over the global batch (every data-parallel rank holds it)
    grad_norm: torch.Tensor | None  # global L2 norm before clipping, ``None`` if unknown


class Strategy(Protocol):
    engine: object
    logits: Callable[[torch.Tensor], torch.Tensor] | None

    def train_step(self, micro_batches: MicroBatches, timer: PhaseTimer | None = None) -> StepOutput: ...

    def eval_loss(self, micro_batches: MicroBatches) -> float: ...


class PlainStep:
    """pp = 1: :class:`megalm.model.GPT` (TP/SP layers and ring attention inside) in a DeepSpeed engine.

    With context parallelism each rank's loss is the mean over its tokens; the losses
    reported here are averaged over dp x cp (equal token counts, so that is the mean over
    the global batch).
    """

    def __init__(self, cfg: Config, ctx: ParallelContext, info: DistInfo) -> None:
        p, t = cfg.parallel, cfg.training
        self.cfg, self.ctx, self.device = cfg, ctx, info.device
        model = GPT(cfg.model, ctx.tp_group, p.sequence_parallel, cfg.run.seed, ctx.cp_group)
        if t.recompute == "full":
            model.set_recompute(t.recompute_interval)
        self.mpu = ctx.as_mpu()
        self.engine = build_engine(cfg, model, ctx.dp, info.device, self.mpu)
        # ZeRO-0 fp32: DeepSpeed clips but does not keep the norm; measure it before the step.
        self.measure_grad_norm = cfg.zero.stage == 0 and resolve_dtype(cfg, info.device) == "fp32"
        self.logits = self._logits

    def train_step(self, micro_batches: MicroBatches, timer: PhaseTimer | None = None) -> StepOutput:
        loss, gnorm = engine_step(
            self.engine, micro_batches, self.device, self.measure_grad_norm, self.mpu, timer
        )
        loss = loss.detach().float().clone()
        if self.ctx.dp_cp > 1:
            dist.all_reduce(loss, group=self.ctx.dp_cp_group)
            loss /= self.ctx.dp_cp
        return StepOutput(loss, gnorm)

    @torch.no_grad()
    def eval_loss(self, micro_batches: MicroBatches) -> float:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, windows)
        for x, y in micro_batches:
            total[0] += self.engine(x.to(self.device), y.to(self.device)).double() * x.size(0)
            total[1] += x.size(0)
        self.engine.train()
        dist.all_reduce(total, group=self.ctx.dp_cp_group)
        return (total[0] / total[1]).item()

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) on every rank; under cp the sequence is right-padded (causal: the
        first T positions do not see the padding), split, run, and gathered back."""
        cp = self.ctx.cp
        if cp == 1:
            return self.engine.module(tokens)
        T, multiple = tokens.size(1), 2 * cp * (self.ctx.tp if self.cfg.parallel.sequence_parallel else 1)
        padded = torch.nn.functional.pad(tokens, (0, -T % multiple))
        local = self.engine.module(shard_sequence(padded, cp, self.ctx.cp_rank))
        return gather_sequence(local, self.ctx.cp_group)[:, :T]


class PipelineStep:
    """pp > 1: the same components as a DeepSpeed ``PipelineModule`` (1F1B schedule)."""

    def __init__(self, cfg: Config, ctx: ParallelContext, info: DistInfo) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, info.device
        self.module = build_pipeline(cfg, ctx, init_seed=cfg.run.seed)
        self.engine, self.clipping = build_pipeline_engine(cfg, self.module, ctx, info.device)
        self.accum = gradient_accumulation(cfg, ctx.dp)
        self.logits = None

    def train_step(self, micro_batches: MicroBatches, timer: PhaseTimer | None = None) -> StepOutput:
        loss = pipeline_train_step(self.engine, micro_batches)
        gnorm = pipeline_grad_norm(self.engine, self.clipping)
        return StepOutput(torch.as_tensor(loss, dtype=torch.float32), gnorm)

    @torch.no_grad()
    def eval_loss(self, micro_batches: MicroBatches) -> float:
        return pipeline_eval_loss(self.engine, micro_batches, self.accum)


def build_strategy(cfg: Config, ctx: ParallelContext, info: DistInfo) -> Strategy:
    """The step strategy of this run, chosen once: pipelined when ``parallel.pp > 1``."""
    return PipelineStep(cfg, ctx, info) if cfg.parallel.pp > 1 else PlainStep(cfg, ctx, info)
