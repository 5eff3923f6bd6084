"""What a user watches: per-step numbers gathered on the device, logged every ``log_interval``.

Losses and gradient norms stay on the device between log steps; at a log step the
last step's loss and norm are read in one host read (the only other one in a step is the
health verdict of :mod:`megalm.train.health`, which must be known before the weights
change; ``tests/host_reads.py`` counts both), the interval's wall time (without evaluation
and checkpoint time) gives tokens/s, and MFU comes from
:func:`megalm.perf.flops.utilization`, the same function the benchmark reports with.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megalm.config import Config
from megalm.perf.devices import peak_flops
from megalm.perf.flops import MODEL_FLOPS_FORMULA, model_flops_per_token, param_count, utilization
from megalm.train.metrics import MetricsLog, memory_gb
from megalm.train.strategy import StepOutput


class Progress:
    """Accumulates :class:`StepOutput` s and writes one record per log interval (rank 0 writes).

    Args:
        cfg: the resolved config.
        device: the training device (peak FLOP/s and memory are read from it).
        world_size: devices in the job (MFU is per device).
        log: rank 0's :class:`MetricsLog`, ``None`` elsewhere.
        extra: constant fields added to every record (e.g. the pipeline bubble).
        start: the step training resumes after (0 for a fresh run).
    """

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        world_size: int,
        log: MetricsLog | None,
        extra: dict[str, Any],
        start: int = 0,
    ) -> None:
        self.cfg, self.device, self.world_size, self.log, self.extra = cfg, device, world_size, log, extra
        self.first_step = start + 1
        self.tokens_per_step = cfg.training.global_batch * cfg.model.seq_len
        self.peak, self.peak_source = peak_flops(device) if log is not None else (1.0, "")
        self._last: StepOutput | None = None  # the interval's last step (device tensors)
        self._steps = 0  # steps in this interval
        self._excluded = 0.0
        self.t_start = self._t_interval = time.perf_counter()

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    def due(self, step: int, last_step: bool = False) -> bool:
        return last_step or step % self.cfg.training.log_interval == 0

    def add(self, out: StepOutput) -> None:
        """Keep one step's loss and norm (device tensors, not read here)."""
        self._last = out
        self._steps += 1

    def maybe_log(
        self,
        step: int,
        lr: float,
        epoch: int,
        last_step: bool = False,
        rank_times: torch.Tensor | None = None,
        on_rank_times: Callable[[list[float]], None] | None = None,
    ) -> dict[str, Any] | None:
        """At a log step: read the interval's numbers in one host read, write and print the record.

        ``rank_times`` (world,) on the device: every rank's own work per step
        (:func:`megalm.train.stragglers.gather_step_times`), read with the loss and handed
        to ``on_rank_times`` before the record is built.
        """
        if not self.due(step, last_step):
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds = max(now - self._t_interval - self._excluded, 1e-9)
        steps, out = self._steps, self._last
        norm = out.loss.new_full((), float("nan")) if out.grad_norm is None else out.grad_norm
        parts = [out.loss.double().reshape(1), norm.to(out.loss.device, torch.float64).reshape(1)]
        if rank_times is not None:
            parts.append(rank_times.to(out.loss.device, torch.float64))
        loss, gnorm, *times = torch.cat(parts).tolist()  # the one host read of a log step
        gnorm = None if out.grad_norm is None else gnorm
        if times and on_rank_times is not None:
            on_rank_times(times)
        tokens_per_s = self.tokens_per_step * steps / seconds
        m, t = self.cfg.model, self.cfg.training
        u = utilization(m, tokens_per_s, self.world_size, self.peak, self.peak_source, t.recompute)
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": gnorm,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": u.model_tflops_per_device,
            "mfu": u.mfu,
            "mem_gb": memory_gb(self.device),
            "step_time_s": seconds / steps,
            **self.extra,
            "elapsed_s": now - self.t_start,
            "epoch": epoch,
        }
        self._last, self._steps, self._excluded, self._t_interval = None, 0, 0.0, now
        if self.log is not None:
            self.log.write(record)
            self._print(record)
        return record

    def _print(self, r: dict[str, Any]) -> None:
        t = self.cfg.training
        done = max(r["step"] - (self.first_step - 1), 1)
        eta = r["elapsed_s"] / done * (t.max_steps - r["step"])
        gnorm = f"{r['grad_norm']:.3f}" if r["grad_norm"] is not None else "n/a"
        print(
            f"step {r['step']:>5}/{t.max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {gnorm} | {r['tokens_per_s']:,.0f} tok/s | {r['tflops_per_device']:.4f} TFLOP/s/dev | "
            f"MFU {r['mfu']:.1%} | mem {r['mem_gb']:.2f} GB | ETA {eta:.0f}s",
            flush=True,
        )

    def header(self, launcher: str, backend: str, dtype: str, dp: int, accum: int, data_line: str) -> str:
        """The run's opening lines: layout, model, data, and the MFU convention with its peak."""
        cfg, m, p = self.cfg, self.cfg.model, self.cfg.parallel
        sp = " (sequence parallel)" if p.sequence_parallel else ""
        cp = f" x cp {p.cp}" if p.cp > 1 else ""
        bubble = self.extra.get("pipeline_bubble", 0.0)
        return (
            f"megalm | launcher {launcher} | world {self.world_size} ({backend}, {self.device}) | "
            f"tp {p.tp}{cp} x pp {p.pp} x dp {dp}{sp} | zero {cfg.zero.stage} | "
            f"pipeline bubble (pp-1)/(m+pp-1) = {bubble:.2f} | {dtype}\n"
            f"model  | {m.family} L={m.n_layers} d={m.d_model} heads={m.n_heads}/{m.kv_heads} "
            f"T={m.seq_len} V={m.vocab_size} | {param_count(m, p.tp) / 1e6:.2f}M params\n"
            f"data   | {data_line} | global batch {cfg.training.global_batch} = micro "
            f"{cfg.training.micro_batch} x accum {accum} x dp {dp}\n"
            f"MFU    | {MODEL_FLOPS_FORMULA} = {model_flops_per_token(m):.3e}; "
            f"peak {self.peak / 1e12:.3f} TFLOP/s ({self.peak_source})\n"
            f"run    | {cfg.run.dir} | steps {self.first_step}..{cfg.training.max_steps}"
        )
