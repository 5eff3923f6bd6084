"""One benchmark configuration: build the trainer's engine, time steps in parts, measure memory.

    python -m megalm.perf.worker --config C.yaml --out DIR [--steps 5 --warmup 2] [key=value ...]
    torchrun --nproc_per_node N -m megalm.perf.worker ...      (also deepspeed, srun)

Builds exactly what ``launch/pretrain.py`` builds (:class:`megalm.train.trainer.Trainer`:
layout checks, data, model, DeepSpeed engine), so a configuration the trainer refuses
fails here with the trainer's message. Each optimizer step is timed in parts, with a
device synchronize around each: forward, backward, optimizer (``engine.step``), and the
time inside ``torch.distributed`` collectives (:class:`megalm.perf.measure.CommTimer`),
which overlaps the other three. ``--warmup`` steps are excluded from every number.
Rank 0 writes ``DIR/result.json`` (``status``: ``ok``, ``failed`` or ``oom``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from megalm.config import Config, load_config, to_dict
from megalm.perf.devices import measure_cpu_peak_flops, peak_flops
from megalm.perf.flops import utilization
from megalm.perf.measure import CommTimer, live_tensor_bytes, saved_activation_bytes
from megalm.train.metrics import memory_gb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class PipelineTimer:
    """Times DeepSpeed pipeline instructions (forward, backward, optimizer) of one engine.

    ``PipelineEngine`` dispatches each schedule instruction through the class-level
    ``_INSTRUCTION_MAP``; an instance-level copy with timed wrappers shadows it.
    Sends/receives and gradient reductions go through ``torch.distributed`` and are
    counted by :class:`CommTimer`.
    """

    PARTS = {"ForwardPass": "forward_s", "BackwardPass": "backward_s", "OptimizerStep": "optimizer_s"}

    def __init__(self, engine, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        timed = {}
        for instr, fn in type(engine)._INSTRUCTION_MAP.items():
            part = self.PARTS.get(instr.__name__)
            timed[instr] = fn if part is None else self._wrap(fn, part, device)
        engine._INSTRUCTION_MAP = timed

    def _wrap(self, fn, part: str, device: torch.device):
        def run(engine, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(engine, *args, **kwargs)
            _sync(device)
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0
            return out

        return run

    def reset(self) -> None:
        self.seconds = {}


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


def run_config(cfg: Config, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones; every rank must call it.

    Returns rank 0's view: mean step-time parts (the max over ranks), tokens/s, memory.
    """
    comm = CommTimer()
    comm.install()  # before DeepSpeed captures torch.distributed functions
    from megalm.train.pipeline import pipeline_train_step
    from megalm.train.trainer import Trainer

    trainer = Trainer(cfg)
    engine, info, device = trainer.engine, trainer.info, trainer.info.device
    cfg = trainer.cfg
    parts = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "comm_s": 0.0, "step_s": 0.0}
    state_bytes, act_bytes = 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipelined = cfg.parallel.pp > 1
    pipe_timer = PipelineTimer(engine, device) if pipelined else None
    for i in range(warmup + steps):
        batches = trainer.batches.step_batches()
        _sync(device)
        comm.take()
        t_step = time.perf_counter()
        if pipe_timer is not None:
            pipe_timer.reset()
            pipeline_train_step(engine, batches)
            _sync(device)
            if i >= warmup:
                for k, v in pipe_timer.seconds.items():
                    parts[k] += v
        else:
            for j, (x, y) in enumerate(batches):
                x, y = x.to(device), y.to(device)
                t0 = time.perf_counter()
                with saved_activation_bytes(engine.module, enabled=i == 0 and j == 0) as saved:
                    loss = engine(x, y)
                _sync(device)
                t1 = time.perf_counter()
                engine.backward(loss)
                _sync(device)
                t2 = time.perf_counter()
                if i == 0 and j == 0:
                    act_bytes = saved["bytes"]
                if i == 1 and j == len(batches) - 1:  # states exist from step 0; gradients are live now
                    state_bytes = max(state_bytes, live_tensor_bytes(engine.module, device))
                engine.step()
                _sync(device)
                t3 = time.perf_counter()
                if i >= warmup:
                    parts["forward_s"] += t1 - t0
                    parts["backward_s"] += t2 - t1
                    parts["optimizer_s"] += t3 - t2
        if i >= warmup:
            parts["step_s"] += time.perf_counter() - t_step
            parts["comm_s"] += comm.take()
        if i == 1:
            state_bytes = max(state_bytes, live_tensor_bytes(engine.module, device))
    comm.uninstall()
    times = torch.tensor([parts[k] / steps for k in parts], dtype=torch.float64)
    mem = torch.tensor([state_bytes, act_bytes], dtype=torch.float64)
    if info.world_size > 1:
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    step_parts = dict(zip(parts, times.tolist(), strict=True))
    per_node = _per_node(parts["step_s"] / steps, memory_gb(device), info.world_size)

    m, t = cfg.model, cfg.training
    tokens_per_s = t.global_batch * m.seq_len / step_parts["step_s"]
    peak, source = peak_flops(device)
    if device.type == "cpu":  # the trainer's one measurement is easily low on a busy machine: best of two
        peak = max(peak, measure_cpu_peak_flops(repeats=20))
    u = utilization(m, tokens_per_s, info.world_size, peak, source, t.recompute)
    return {
        "status": "ok",
        "world_size": info.world_size,
        "launcher": info.launcher,
        "device": str(device),
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
        **step_parts,
        "peak_mem_gb": memory_gb(device),
        "model_state_bytes": int(mem[0]),
        # not measured through the pipeline engine (its schedule interleaves micro-batches)
        "activation_bytes_per_micro_batch": None if pipelined else int(mem[1]),
        "per_node": per_node,
        "steps_timed": steps,
        "warmup_steps": warmup,
    }


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
