"""How one optimizer step runs: chosen once at start-up, plain (pp = 1) or pipelined (pp > 1).

Both strategies build the model and the DeepSpeed engine and answer the same three
questions for the trainer, so the trainer never asks "is this pipelined?":

- ``train_step(micro_batches, timer)``: one optimizer step; the data-parallel mean
  loss and the gradient norm stay on the device (read at log time);
- ``eval_loss(micro_batches)``: mean held-out loss over every rank's windows;
- ``lm``: the model as a generation callable, ``lm(tokens, position_ids=, doc_ids=,
  cache=) -> logits`` (:mod:`megalm.model.generate`; collective: every rank calls it),
  and ``module``, the ``nn.Module`` it runs (for :func:`megalm.model.decoding`).

``timer`` is the timing hook the benchmark uses (``megalm/perf``): both steps
report ``forward``, ``backward`` and ``optimizer`` phases through it (the pipelined
one from torch hooks, :func:`megalm.train.pipeline.timed_phases`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist

from megalm.config import Config
from megalm.model import build_model
from megalm.model.compile import compile_blocks
from megalm.parallel import ParallelContext
from megalm.train.dist import DistInfo
from megalm.train.engine import build_engine, gradient_accumulation, resolve_dtype
from megalm.train.generation import PipelineLM
from megalm.train.health import Health
from megalm.train.pipeline import (
    build_pipeline,
    build_pipeline_engine,
    pipeline_eval_loss,
    pipeline_grad_norm,
    pipeline_train_step,
)
from megalm.train.step import PhaseTimer, engine_step

MicroBatches = list[tuple[torch.Tensor, ...]]  # (tokens, labels[, position_ids, doc_ids])


class StepOutput(NamedTuple):
    """One optimizer step's numbers, as 0-d fp32 tensors on the training device."""

    loss: torch.Tensor  # mean over the global batch (every data-parallel rank holds it)
    grad_norm: torch.Tensor | None  # global L2 norm before clipping, ``None`` if unknown


class Strategy(Protocol):
    engine: object
    module: torch.nn.Module
    lm: Callable[..., torch.Tensor]
    compiled: int  # modules compiled by training.compile (blocks and loss of this rank), 0 if off

    def train_step(self, micro_batches: MicroBatches, timer: PhaseTimer | None = None) -> StepOutput: ...

    def eval_loss(self, micro_batches: MicroBatches) -> float: ...


class PlainStep:
    """pp = 1: :class:`megalm.model.GPT` (TP/SP layers and ring attention inside) or the LSTM in a
    DeepSpeed engine.

    With context parallelism each rank's loss is the mean over its tokens; the losses
    reported here are averaged over dp x cp (equal token counts, so that is the mean over
    the global batch).
    """

    def __init__(
        self, cfg: Config, ctx: ParallelContext, info: DistInfo, health: Health | None = None
    ) -> None:
        p, t = cfg.parallel, cfg.training
        self.cfg, self.ctx, self.device, self.health = cfg, ctx, info.device, health
        model = build_model(cfg.model, ctx.tp_group, p.sequence_parallel, cfg.run.seed, ctx.cp_group)
        if t.recompute == "full":
            model.set_recompute(t.recompute_interval)
        self.compiled = compile_blocks(model) if t.compile else 0
        self.mpu = ctx.as_mpu()
        self.engine = build_engine(cfg, model, ctx.dp, info.device, self.mpu)
        # ZeRO-0 fp32: DeepSpeed clips but does not keep the norm; measure it before the step.
        self.measure_grad_norm = cfg.zero.stage == 0 and resolve_dtype(cfg, info.device) == "fp32"
        self.module = self.lm = self.engine.module  # ZeRO-3 gathers parameters in its forward hooks
        if health is not None:
            health.install(self.engine)

    def train_step(self, micro_batches: MicroBatches, timer: PhaseTimer | None = None) -> StepOutput:
        mean: list[torch.Tensor] = []

        def before_step(loss: torch.Tensor, gnorm: torch.Tensor | None) -> None:
            # The data-parallel mean loss is known before the optimizer step, so the health
            # check can judge it (the same one all-reduce as after the step, moved earlier).
            loss = loss.float().clone()
            if self.ctx.dp_cp > 1:  # each cp rank's mean over its T/cp tokens: average over dp x cp
                dist.all_reduce(loss, group=self.ctx.dp_cp_group)
                loss /= self.ctx.dp_cp
            mean.append(loss)
            if self.health is not None:
                self.health.set_pending(loss, gnorm)

        _, gnorm = engine_step(
            self.engine, micro_batches, self.device, self.measure_grad_norm, self.mpu, timer, before_step
        )
        return StepOutput(mean[0], gnorm)

    @torch.no_grad()
    def eval_loss(self, micro_batches: MicroBatches) -> float:
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, windows)
        for batch in micro_batches:
            x, y, *ids = (t.to(self.device) for t in batch)
            total[0] += self.engine(x, y, *ids).double() * x.size(0)
            total[1] += x.size(0)
        self.engine.train()
        dist.all_reduce(total, group=self.ctx.dp_cp_group)
        return (total[0] / total[1]).item()


class PipelineStep:
    """pp > 1: the same components as a DeepSpeed ``PipelineModule`` (1F1B schedule)."""

    def __init__(
        self, cfg: Config, ctx: ParallelContext, info: DistInfo, health: Health | None = None
    ) -> None:
        self.cfg, self.ctx, self.device = cfg, ctx, info.device
        self.module = build_pipeline(cfg, ctx, init_seed=cfg.run.seed)
        self.compiled = compile_blocks(self.module) if cfg.training.compile else 0
        self.engine, self.clipping = build_pipeline_engine(cfg, self.module, ctx, info.device)
        self.accum = gradient_accumulation(cfg, ctx.dp)
        self.lm = PipelineLM(self.module, ctx, cfg.model)  # pipelined decode, see megalm/train/generation.py
        if health is not None:  # checks inside train_batch, at the engine's optimizer step
            health.install(self.engine, pipeline=True)

    def train_step(self, micro_batches: MicroBatches, timer: PhaseTimer | None = None) -> StepOutput:
        loss = pipeline_train_step(self.engine, micro_batches, timer)
        gnorm = pipeline_grad_norm(self.engine, self.clipping)
        return StepOutput(loss.float(), gnorm)

    @torch.no_grad()
    def eval_loss(self, micro_batches: MicroBatches) -> float:
        return pipeline_eval_loss(self.engine, micro_batches, self.accum)


def build_strategy(
    cfg: Config, ctx: ParallelContext, info: DistInfo, health: Health | None = None
) -> Strategy:
    """The step strategy of this run, chosen once: pipelined when ``parallel.pp > 1``.

    ``health``: checks every optimizer step before it is applied (hooked into the engine).
    """
    step = PipelineStep if cfg.parallel.pp > 1 else PlainStep
    return step(cfg, ctx, info, health)
