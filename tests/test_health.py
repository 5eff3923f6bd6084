"""Numerical health: the verdict before the optimizer step, for every ZeRO stage and the pipeline.

The in-process tests build real DeepSpeed engines on 2 gloo ranks and poison one rank's
gradient (NaN) with a finite loss, the case the issue found applied and saved: every rank
must skip, the weights, Adam moments and LR schedule must stay bit for bit, and the next
step must equal that of an engine that never saw the bad batch. The end-to-end tests run
``launch/pretrain.py`` with ``optim.lr=1e6`` on 1 and 2 ranks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megalm.config import Config
from megalm.config.schema import (
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    PreemptConfig,
    TrainingConfig,
    ZeroConfig,
)
from megalm.parallel import ParallelContext, ParallelDims
from megalm.train.dist import DistInfo
from megalm.train.health import Health, SpikeDetector, state_is_finite, state_tensors
from megalm.train.metrics import read_metrics
from megalm.train.preempt import Preemption
from megalm.train.strategy import build_strategy
from tests.conftest import tiny_overrides
from tests.distributed import run_distributed
from tests.launching import finish, run_pretrain, start_ranks


def small_config(stage: int = 0, pp: int = 1, dtype: str = "fp32", **training) -> Config:
    return Config(
        model=ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab_multiple=64),
        training=TrainingConfig(global_batch=4, micro_batch=1, max_steps=10, **training),
        optim=OptimConfig(lr=1e-2, warmup_steps=3, grad_clip=1.0),
        parallel=ParallelConfig(pp=pp),
        zero=ZeroConfig(stage=stage),
        precision=PrecisionConfig(dtype=dtype),
        preempt=PreemptConfig(signals=""),
    )


def batches(step: int, dp_rank: int, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    out = []
    for _ in range(accum):
        t = torch.randint(0, 250, (1, 17), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def snapshot(engine) -> list[torch.Tensor]:
    return [t.detach().clone() for t in state_tensors(engine)]


def _skip_cases(rank: int, world: int, cases: list[tuple[int, int, str]]) -> list[str]:
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(rank))
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False)  # wraps the running group
    return [_skip_case(rank, world, *case) for case in cases]


def _skip_case(rank: int, world: int, stage: int, pp: int, dtype: str) -> str:
    cfg = small_config(stage, pp, dtype)
    dims = ParallelDims.from_world(world, 1, pp)
    ctx = ParallelContext(dims)
    info = DistInfo(rank, world, rank, world, torch.device("cpu"), "gloo", "test")
    accum = cfg.training.global_batch // (cfg.training.micro_batch * dims.dp)
    health = Health(cfg, Preemption(cfg.preempt), info.device)
    torch.manual_seed(0)
    a = build_strategy(cfg, ctx, info, health)
    torch.manual_seed(0)
    b = build_strategy(cfg, ctx, info)  # the reference: never sees the poisoned batch

    a.train_step(batches(1, ctx.dp_rank, accum))
    b.train_step(batches(1, ctx.dp_rank, accum))
    assert health.verdict.applied, health.verdict
    before, lr = snapshot(a.engine), a.engine.get_lr()
    epoch = a.engine.lr_scheduler.last_epoch

    poison_rank = 0 if pp > 1 else 1  # pp: the first stage (the loss, on the last, stays finite)
    param = next(p for p in a.engine.module.parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: g * float("nan")) if rank == poison_rank else None
    a.train_step(batches(2, ctx.dp_rank, accum))
    if hook is not None:
        hook.remove()
    v = health.verdict
    assert (v.action, v.reason) == ("skip", "non-finite gradients"), v
    assert math.isfinite(v.loss), "the loss stays finite: only the gradients are poisoned"
    after = snapshot(a.engine)
    assert len(after) == len(before) and all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert a.engine.get_lr() == lr and a.engine.lr_scheduler.last_epoch == epoch
    assert a.engine.skipped_steps == 1 and health.skipped == 1

    a.train_step(batches(3, ctx.dp_rank, accum))
    b.train_step(batches(3, ctx.dp_rank, accum))
    assert health.verdict.applied
    got, want = snapshot(a.engine), snapshot(b.engine)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), "skip left a trace"
    assert not all(torch.equal(x, y) for x, y in zip(got, before, strict=True)), "step 3 trained"
    assert state_is_finite(a.engine, info.device)
    if rank == 0:  # a NaN weight on one rank: every rank refuses to save
        with torch.no_grad():
            state_tensors(a.engine)[0].view(-1)[0] = float("nan")
    assert not state_is_finite(a.engine, info.device)
    return type(a.engine.optimizer).__name__


@pytest.mark.slow
@pytest.mark.parametrize(
    "cases",
    [
        [(0, 1, "fp32"), (1, 1, "fp32"), (2, 1, "fp32"), (3, 1, "fp32")],
        [(0, 2, "fp32")],
        [(0, 1, "bf16"), (1, 1, "bf16")],
    ],
    ids=["zero0-3", "pipeline", "bf16"],
)
def test_nonfinite_gradients_skip_the_step_on_every_rank_leaving_no_trace(cases):
    """2 ranks; one rank's gradient is NaN, the loss finite. ZeRO 0-3, the pipeline engine,
    and bf16 (DeepSpeed's FP16_UnfusedOptimizer and BF16_Optimizer wrappers)."""
    optimizers = run_distributed(2, _skip_cases, cases, timeout=900)
    for (stage, pp, dtype), name in zip(cases, optimizers[0], strict=True):
        print(f"zero {stage} pp {pp} {dtype}: {name} skipped on both ranks, no trace")


def _decide_case(rank: int, world: int) -> list[tuple[str, str]]:
    cfg = small_config(max_skipped_steps=2, spike_factor=2.0, spike_window=3, on_spike="rollback")
    preempt = Preemption(cfg.preempt)
    health = Health(cfg, preempt, torch.device("cpu"))
    out = []
    for loss, gnorm in [
        (3.0, 1.0),
        (2.0, 1.0),
        (2.5, 1.0),
        (5.1, 1.0),
        (2.4, float("inf")),
        (2.4, 1e20),
        (2.3, 1.0),
    ]:
        health.set_pending(torch.tensor(loss), torch.tensor(gnorm))
        v = health.decide()
        out.append((v.action, v.reason))
    preempt.signum = 10 if rank == 1 else None  # a signal on rank 1 reaches rank 0 in the same all-reduce
    health.set_pending(torch.tensor(2.2), torch.tensor(1.0))
    assert health.decide().stop_signal
    return out


def test_verdicts_spike_rollback_limit_and_the_preemption_flag_agree_on_every_rank():
    """Window 3, factor 2: 5.1 > 2 x median(3, 2, 2.5) is a spike (rollback); an inf norm and a norm
    whose square overflows fp32 (Adam's second moment) are non-finite; the third skip exceeds
    max_skipped_steps=2 and stops."""
    results = run_distributed(2, _decide_case)
    assert results[0] == results[1]
    assert results[0] == [
        ("step", ""),
        ("step", ""),
        ("step", ""),
        ("rollback", "loss spike: 5.1000 > 2 x running median 2.5000"),
        ("skip", "non-finite gradients"),
        ("stop", "non-finite gradients; 3 skipped steps exceed training.max_skipped_steps=2"),
        ("step", ""),
    ]


def test_spike_detector_needs_a_full_window_and_is_off_at_factor_0():
    d = SpikeDetector(3.0, 4)
    for loss in (1.0, 1.0, 1.0):
        assert d.check(100.0) == ""  # window not full yet
        d.add(loss)
    d.add(2.0)
    assert d.check(3.1) and not d.check(2.9)  # median(1, 1, 1, 2) = 1
    assert SpikeDetector(0.0, 1).check(1e9) == ""


def _finite_tags(run_dir: Path) -> list[str]:
    """Every written tag, after checking each tensor in each of its files is finite."""
    tags = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
    for tag in tags:
        for f in tag.rglob("*.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)
            stack = [state]
            while stack:
                x = stack.pop()
                if torch.is_tensor(x) and x.is_floating_point():
                    assert torch.isfinite(x).all(), f"non-finite tensor in {f}"
                elif isinstance(x, dict):
                    stack += list(x.values())
                elif isinstance(x, (list, tuple)):
                    stack += list(x)
    return [t.name for t in tags]


def _run(overrides: list[str], world: int) -> list[tuple[int, str, float]]:
    if world == 1:
        proc = run_pretrain(overrides)
        return [(proc.returncode, proc.stdout + proc.stderr, 0.0)]
    return finish(start_ranks(overrides, world), 600)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_lr_1e6_never_writes_a_nonfinite_tag_stop_exits_2_and_resume_goes_on_skipping(
    shards_dir, tmp_path, world
):
    """``optim.lr=1e6``: ``stop`` exits 2 on every rank naming the finite latest tag; ``resume=auto``
    loads it and, under ``skip``, goes on counting skipped steps; no tag is ever non-finite."""
    lr = {"optim.lr": 1e6, "optim.warmup_steps": 1, "optim.grad_clip": 0.0, "training.save_interval": 2}
    stop = tiny_overrides(
        tmp_path, shards_dir, **lr, **{"training.max_steps": 8, "training.on_nonfinite": "stop"}
    )
    results = _run(stop, world)
    assert [r[0] for r in results] == [2] * world, results[0][1][-3000:]
    errors = [line for line in results[0][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "training.on_nonfinite=stop" in errors[0], (
        errors
    )
    tags = _finite_tags(tmp_path)
    assert tags and f"the newest checkpoint, {tags[-1]} in" in errors[0]
    stopped = int(errors[0].split("step ")[1].split(" ")[0])
    print(f"world {world}: {errors[0]}")

    resume = tiny_overrides(tmp_path, shards_dir, **lr, **{"training.max_steps": stopped + 3})
    results = _run(resume, world)
    assert [r[0] for r in results] == [0] * world, results[0][1][-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / tags[-1]} at step" in results[0][1]
    records = read_metrics(tmp_path / "metrics.jsonl")
    skips = [r for r in records if r.get("event") == "skip"]
    assert skips and all(r["reason"].startswith("non-finite") for r in skips)
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == stopped + 3 and train[-1]["skipped_steps"] == skips[-1]["skipped_steps"]
    timed = [r for r in train if r["rank_work_s_median"] is not None]  # not the first interval of a run
    assert timed and all(r["rank_work_s_max"] >= r["rank_work_s_median"] > 0 for r in timed)
    assert all(isinstance(r["stragglers"], list) for r in train)
    assert set(_finite_tags(tmp_path)) >= set(tags)
    for tag in _finite_tags(tmp_path):  # a tag is written only after an applied step
        assert int(tag.split("_")[1]) not in {r["step"] for r in skips}
        meta = json.loads((tmp_path / "checkpoints" / tag / "meta.json").read_text())
        assert "skipped_steps" in meta["health"]
    print(f"world {world}: resumed from {tags[-1]}, {skips[-1]['skipped_steps']} skipped steps counted")


def test_fp16_on_a_device_deepspeed_cannot_run_it_is_one_error_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine runs fp16: the loss-scaler path runs in the GPU suite")
    proc = run_pretrain([f"run.dir={tmp_path}", "precision.dtype=fp16"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(
        "error: precision.dtype=fp16 is not supported by DeepSpeed on this machine's cpu"
    )
    assert "dist   |" not in proc.stdout  # before any process group
    print(lines[0])


@pytest.mark.slow
def test_loss_spike_rolls_back_to_the_newest_tag_and_skips_the_batches_since(shards_dir, tmp_path):
    """10 good steps (tag 10), then ``optim.lr=0.5`` on resume: the loss spikes above 1.5 x its
    running median, the run reloads tag 10 and goes on after the offending batches; the second
    spike exceeds ``training.max_skipped_steps=1`` and stops (exit 2), tag 10 still latest."""
    proc = run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 10}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    spiky = {"optim.lr": 0.5, "training.spike_factor": 1.5, "training.spike_window": 3}
    spiky |= {"training.on_spike": "rollback", "training.max_skipped_steps": 1, "training.max_steps": 20}
    proc = run_pretrain(tiny_overrides(tmp_path, shards_dir, **spiky))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    rolled = [line for line in proc.stdout.splitlines() if line.startswith("health | rolled back")]
    assert len(rolled) == 1 and rolled[0].startswith("health | rolled back to step 10; the batches of steps")
    error = proc.stderr.strip().splitlines()[-1]
    assert "loss spike" in error and "exceed training.max_skipped_steps=1" in error, error
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "event" in r]
    assert [e["event"] for e in events] == ["rollback", "stop"]
    assert events[0]["rollbacks"] == 0 and events[-1]["skipped_steps"] == 2
    print(rolled[0])
    print(error)
