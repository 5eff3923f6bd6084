"""Numerical health of every optimizer step, decided before the weights change.

Anchors: torchtitan all-reduces a non-finite flag before its optimizer step; Megatron-LM
skips an iteration whose gradient norm is NaN/inf; PaLM (Chowdhery et al. 2022, section
5.1) restarts from a checkpoint before a loss spike and skips the batches around it.

Per optimizer step, after the last micro-batch's backward and before the optimizer:

1. each rank looks at what it holds: the data-parallel mean loss (plain path: already
   all-reduced; pipeline: on the last stage) and its own gradients (the norm the plain
   ZeRO-0 fp32 path measures anyway, else the fp32 norm of its local gradient tensors or
   ZeRO partitions: NaN/inf, or a square that overflows fp32 and would make Adam's
   second moment inf);
2. ONE all-reduce (MAX over every rank) of ``[loss non-finite, gradients non-finite,
   preemption signal, loss]`` and ONE host read: every rank gets the same verdict and
   the preemption flag of :mod:`megalm.train.preempt` rides along;
3. the verdict: apply the step, or skip it (``training.on_nonfinite`` /
   ``training.on_spike``; a loss above ``spike_factor`` x the running median of the last
   ``spike_window`` applied steps is a spike), stop, or roll back (the trainer reloads
   the last checkpoint after this skipped step).

A skip goes through DeepSpeed's own fp16-overflow path, the same for every ZeRO stage,
precision and the pipeline engine: the hook on the engine's ``_take_model_step`` (both
``engine.step()`` and ``PipelineEngine._exec_optimizer_step`` call it) makes the inner
torch optimizer's ``step`` a no-op (weights, Adam moments and their step count stay) and
sets the wrapper's ``overflow`` flag, so DeepSpeed zeroes the gradients, frees its
partition buffers as after any step, does not step the LR scheduler and counts
``engine.skipped_steps``. A step DeepSpeed skips by itself (fp16 loss-scale overflow) is
reported as such and not counted against ``training.max_skipped_steps``.
"""

from __future__ import annotations

import functools
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megalm.config import Config

NONFINITE_LOSS, NONFINITE_GRADS, STOP_SIGNAL, LOSS = range(4)


class NonFiniteError(FloatingPointError):
    """Training cannot go on: a non-finite or spiking step under a ``stop`` policy, or too many skips."""


@dataclass
class Verdict:
    """What happened to one optimizer step (the same on every rank)."""

    action: str = "step"  # step | skip | stop | rollback
    reason: str = ""  # why the step was not applied ("" when it was)
    loss: float = float("nan")  # data-parallel mean loss (NaN when non-finite or unknown)
    stop_signal: bool = False  # a preemption signal reached some rank
    by_deepspeed: bool = False  # DeepSpeed skipped it by itself (fp16 loss-scale overflow)

    @property
    def applied(self) -> bool:
        return self.action == "step"

    @property
    def nonfinite(self) -> bool:
        """The step saw a NaN/inf loss or gradient: the current state must not be saved."""
        return self.reason.startswith("non-finite")


def _fp32_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of ``tensors`` computed in fp32, a 0-d tensor: NaN/inf if any element is,
    or if a square overflows fp32 (what Adam's second moment would hold)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def local_gradients(engine) -> list[torch.Tensor]:
    """The gradient tensors this rank holds at the accumulation boundary, per DeepSpeed optimizer.

    ZeRO-3: the flat buffer of this rank's gradient partitions. ZeRO-1/2: the reduced
    partition tensors (``averaged_gradients``, what DeepSpeed's own fp16 overflow check
    reads). BF16_Optimizer: its fp32 partition gradients. ZeRO-0 (plain or fp16/bf16
    wrapper): the module's ``.grad`` (already averaged over data-parallel ranks).
    """
    opt = engine.optimizer
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:
        return [opt.grad_partitions_flat_buffer]
    if isinstance(getattr(opt, "averaged_gradients", None), dict):
        return [g for grads in opt.averaged_gradients.values() if grads for g in grads if g is not None]
    if getattr(opt, "fp32_groups_gradient_flat_partition", None) is not None:
        return list(opt.fp32_groups_gradient_flat_partition)
    return [p.grad for p in engine.module.parameters() if p.grad is not None]


def pipeline_loss(engine) -> torch.Tensor | None:
    """Pipeline engine, inside its optimizer step: the data-parallel mean loss on the last
    stage (``None`` on the others), as DeepSpeed's ``_aggregate_total_loss`` computes it after."""
    if not engine.is_last_stage() or engine.total_loss is None:
        return None
    loss = engine.total_loss.detach().float() / engine.gradient_accumulation_steps()
    if engine.is_data_parallel:
        dist.all_reduce(loss, group=engine.mpu.get_data_parallel_group())
        loss /= engine.dp_world_size
    return loss


class SpikeDetector:
    """A loss above ``factor`` x the median of the last ``window`` applied losses is a spike."""

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> str:
        """The reason ``loss`` is a spike, or ``""``; only once the window is full."""
        if self.factor <= 0 or len(self.losses) < (self.losses.maxlen or 0):
            return ""
        median = statistics.median(self.losses)
        if loss > self.factor * median:
            return f"loss spike: {loss:.4f} > {self.factor:g} x running median {median:.4f}"
        return ""

    def add(self, loss: float) -> None:
        self.losses.append(loss)


class Health:
    """The per-step verdict of the module docstring, hooked into a DeepSpeed engine.

    Args:
        cfg: the resolved config (``training.on_nonfinite``, ``max_skipped_steps``,
            ``spike_factor``, ``spike_window``, ``on_spike``).
        preempt: the run's :class:`megalm.train.preempt.Preemption` (its flag rides along).
        device: the training device (where the flag tensor lives).
    """

    def __init__(self, cfg: Config, preempt, device: torch.device) -> None:
        self.t = cfg.training
        self.preempt, self.device = preempt, device
        self.spikes = SpikeDetector(self.t.spike_factor, self.t.spike_window)
        self.skipped = 0  # steps megalm decided not to apply (counted against max_skipped_steps)
        self.scaler_skips = 0  # steps DeepSpeed's loss scaler skipped
        self.rollbacks = 0
        self.verdict = Verdict()
        self._loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._skipping = False
        self._pipeline = False

    # -- wiring ---------------------------------------------------------------------
    def install(self, engine, pipeline: bool = False) -> None:
        """Hook ``engine`` so every optimizer step asks :meth:`decide` first."""
        self.engine, self._pipeline = engine, pipeline
        take_model_step = engine._take_model_step

        def checked_take_model_step(lr_kwargs=None) -> None:
            self.verdict = self.decide()
            self._skipping = not self.verdict.applied
            before = engine.skipped_steps
            try:
                take_model_step(lr_kwargs)
            finally:
                self._skipping = False
            if self.verdict.applied and engine.skipped_steps > before:
                self.verdict = Verdict(
                    "skip", "loss-scale overflow", self.verdict.loss, self.verdict.stop_signal, True
                )
                self.scaler_skips += 1

        engine._take_model_step = checked_take_model_step
        inner = getattr(engine, "basic_optimizer", None) or engine.optimizer
        self._wrap_inner(inner, sets_overflow=inner is engine.optimizer)
        if inner is not engine.optimizer:
            self._wrap_outer(engine.optimizer)

    def _wrap_inner(self, opt, sets_overflow: bool) -> None:
        step = opt.step

        @functools.wraps(step)  # keeps torch's LR-scheduler marker on the wrapped step
        def step_unless_skipping(*args, **kwargs):
            if sets_overflow:
                opt.overflow = self._skipping
            return None if self._skipping else step(*args, **kwargs)

        opt.step = step_unless_skipping

    def _wrap_outer(self, opt) -> None:
        step = opt.step

        @functools.wraps(step)
        def step_then_flag(*args, **kwargs):
            out = step(*args, **kwargs)
            if self._skipping:
                opt.overflow = True
            return out

        opt.step = step_then_flag

    def set_pending(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Plain path, before the last ``engine.step()``: this step's data-parallel mean loss
        and, if measured anyway, the global gradient norm (then no second pass over gradients)."""
        self._loss, self._grad_norm = loss, grad_norm

    # -- the decision ---------------------------------------------------------------
    def _local_flags(self) -> torch.Tensor:
        loss = pipeline_loss(self.engine) if self._pipeline else self._loss
        gnorm = self._grad_norm if self._grad_norm is not None else _fp32_norm(local_gradients(self.engine))
        self._loss = self._grad_norm = None
        flags = torch.zeros(4, dtype=torch.float64, device=self.device)
        flags[LOSS] = float("-inf")
        if loss is not None:
            finite = torch.isfinite(loss.double())
            flags[NONFINITE_LOSS] = (~finite).double()
            flags[LOSS] = torch.where(finite, loss.double(), float("-inf"))
        gnorm = gnorm.to(self.device, torch.float32)
        flags[NONFINITE_GRADS] = (~torch.isfinite(gnorm * gnorm)).double()
        flags[STOP_SIGNAL] = self.preempt.local_flag()
        return flags

    def decide(self) -> Verdict:
        """Collective (every rank, inside the optimizer step): the agreed verdict."""
        flags = self._local_flags()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite_loss, nonfinite_grads, signal, loss = flags.tolist()  # the one host read per step
        stop_signal = self.preempt.agree(signal > 0)
        known = loss > float("-inf")  # -inf: no rank had a finite loss (non-finite, or none yet)
        if nonfinite_loss or nonfinite_grads:
            what = "loss" if nonfinite_loss else "gradients"
            value = loss if known and not nonfinite_loss else float("nan")
            return self._not_applied(f"non-finite {what}", self.t.on_nonfinite, value, stop_signal)
        spike = self.spikes.check(loss) if known else ""
        if spike:
            return self._not_applied(spike, self.t.on_spike, loss, stop_signal)
        if known:
            self.spikes.add(loss)
        return Verdict("step", "", loss if known else float("nan"), stop_signal)

    def _not_applied(self, reason: str, policy: str, loss: float, stop_signal: bool) -> Verdict:
        self.skipped += 1
        if policy != "stop" and self.skipped > self.t.max_skipped_steps:
            reason += (
                f"; {self.skipped} skipped steps exceed training.max_skipped_steps={self.t.max_skipped_steps}"
            )
            policy = "stop"
        return Verdict(policy, reason, loss, stop_signal)

    # -- checkpointed counters --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped,
            "loss_scale_skips": self.scaler_skips,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped_steps", 0))
        self.scaler_skips = int(state.get("loss_scale_skips", 0))
        self.rollbacks = int(state.get("rollbacks", 0))


def state_tensors(engine) -> list[torch.Tensor]:
    """Every tensor a checkpoint of ``engine`` holds on this rank: module parameters, the
    inner optimizer's (fp32 master) parameters and its states (Adam moments)."""
    out = [p.detach() for p in engine.module.parameters() if p.numel()]
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    for group in opt.param_groups:
        out += [p.detach() for p in group["params"] if p.numel()]
    for state in opt.state.values():
        out += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    return out


def state_is_finite(engine, device: torch.device) -> bool:
    """Collective: no rank holds a NaN/inf parameter or optimizer state (checked before a save)."""
    tensors = state_tensors(engine)
    bad = torch.zeros(1, device=device)
    if tensors:
        extremes = torch.stack([torch.stack([t.max(), t.min()]).float().to(device) for t in tensors])
        bad[0] = (~torch.isfinite(extremes)).any().float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
