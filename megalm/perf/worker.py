"""One benchmark configuration: the trainer's own step, timed in phases, and its memory.

    python -m megalm.perf.worker --config C.yaml --out DIR [--steps 5 --warmup 2] [key=value ...]
    torchrun --nproc_per_node N -m megalm.perf.worker ...      (also the DeepSpeed launcher, srun)

Builds exactly what ``launch/pretrain.py`` builds (:class:`megalm.train.trainer.Trainer`:
layout checks, data, model, engine, step strategy), so a configuration the trainer
refuses fails here with the trainer's message, and runs the trainer's step,
``trainer.strategy.train_step(micro_batches, timer)``, with
:class:`megalm.perf.measure.StepTimer` as the timing hook: forward, backward and
optimizer phases (device-synchronized), the whole step, and the time inside
``torch.distributed`` collectives (which overlaps the phases). ``--warmup`` steps are
excluded from every number; memory is measured in them (activations in the first,
model states in the second). MFU is :func:`megalm.perf.flops.utilization` with the
peak of :func:`megalm.perf.devices.peak_flops`, as the trainer logs it.
Rank 0 writes ``DIR/result.json`` (``status``: ``ok``, ``failed`` or ``oom``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from megalm.config import Config, load_config, to_dict
from megalm.perf.devices import peak_flops
from megalm.perf.flops import utilization
from megalm.perf.measure import CommTimer, StepTimer
from megalm.train.metrics import memory_gb


def _per_node(step_s: float, mem_gb: float, world_size: int) -> dict[str, dict[str, float]]:
    """``{hostname: {"ranks", "max_step_s", "max_peak_mem_gb"}}`` over every rank (collective)."""
    mine = (socket.gethostname(), step_s, mem_gb)
    everyone = [mine]
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, mine)
    nodes: dict[str, dict[str, float]] = {}
    for host, t, m in everyone:
        n = nodes.setdefault(host, {"ranks": 0, "max_step_s": 0.0, "max_peak_mem_gb": 0.0})
        n["ranks"] += 1
        n["max_step_s"] = max(n["max_step_s"], t)
        n["max_peak_mem_gb"] = max(n["max_peak_mem_gb"], m)
    return nodes


def _max_over_ranks(values: list[float], world_size: int) -> list[float]:
    """Element-wise maximum over every rank (collective when ``world_size > 1``)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def time_steps(trainer, steps: int, warmup: int, comm: CommTimer) -> StepTimer:
    """Run ``warmup + steps`` optimizer steps of the trainer's strategy under a :class:`StepTimer`."""
    timer = StepTimer(trainer.engine.module, trainer.info.device, comm)
    pipelined = trainer.cfg.parallel.pp > 1  # 1F1B interleaves micro-batches: no per-forward figure
    for i in range(warmup + steps):
        micro_batches = trainer.batches.step_batches()
        timer.begin(activations=i == 0 and not pipelined, states=i == 1)
        trainer.strategy.train_step(micro_batches, timer)
        timer.end(timed=i >= warmup)
    return timer


def run_config(cfg: Config, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones; every rank must call it.

    Returns rank 0's view: mean step-time parts (the max over ranks), tokens/s, memory.
    """
    comm = CommTimer()
    comm.install()  # before DeepSpeed captures torch.distributed functions
    try:
        from megalm.train.trainer import Trainer

        trainer = Trainer(cfg)
        timer = time_steps(trainer, steps, warmup, comm)
    finally:
        comm.uninstall()
    info, cfg = trainer.info, trainer.cfg
    mine = timer.mean_seconds()
    parts = dict(zip(mine, _max_over_ranks(list(mine.values()), info.world_size), strict=True))
    pipelined = cfg.parallel.pp > 1
    memory = [timer.state_bytes, timer.activation_bytes or 0]
    state_bytes, act_bytes = _max_over_ranks(memory, info.world_size)
    m, t = cfg.model, cfg.training
    tokens_per_s = t.global_batch * m.seq_len / parts["step_s"]
    u = utilization(m, tokens_per_s, info.world_size, *peak_flops(info.device), t.recompute)
    return {
        "status": "ok",
        "world_size": info.world_size,
        "launcher": info.launcher,
        "device": str(info.device),
        "dp": trainer.dp,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": u.tokens_per_s_per_device,
        "tflops_per_device": u.model_tflops_per_device,
        "hw_tflops_per_device": u.hardware_tflops_per_device,
        "mfu": u.mfu,
        "hfu": u.hfu,
        "mfu_causal": u.mfu_causal,
        "peak_tflops": u.peak_tflops,
        "peak_source": u.peak_source,
        "formula": u.formula() + f"; training.recompute={t.recompute}",
        "recompute": t.recompute,
        "pipelined": pipelined,
        **parts,
        "peak_mem_gb": memory_gb(info.device),
        "model_state_bytes": int(state_bytes),
        "activation_bytes_per_micro_batch": None if pipelined else int(act_bytes),
        "per_node": _per_node(mine["step_s"], memory_gb(info.device), info.world_size),
        "steps_timed": steps,
        "warmup_steps": warmup,
    }


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark one megalm configuration.")
    p.add_argument("--config", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.warmup < 2:
        p.error("--warmup must be >= 2 (memory is measured in the first two steps)")
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_config(cfg, args.steps, args.warmup)
        rc = 0
    except Exception as e:  # recorded, the sweep goes on
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        result = {"status": "oom" if oom else "failed", "error": f"{type(e).__name__}: {e}".strip()}
        if not oom and not isinstance(e, ValueError):
            result["traceback"] = traceback.format_exc()[-3000:]
        rc = 1
    if _rank() == 0:
        if cfg is not None:
            result["config"] = to_dict(cfg)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("config", "traceback")}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
