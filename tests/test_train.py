"""End-to-end training through launch/pretrain.py: layouts, ZeRO stages, resume, errors.

These start real processes (plain python, ``deepspeed --num_gpus 2``, ``torchrun``,
``mpirun``) on CPU with gloo, exactly as a user would, and compare every run with the
golden curve (tests/golden): one process bit for bit, other layouts within 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megalm.train.metrics import read_metrics
from tests.conftest import ROOT
from tests.golden import SAME_ARITHMETIC, assert_matches_golden, golden_run_overrides
from tests.launching import cpu_env, run_pretrain

SHM = Path("/dev/shm")
NO_TENSORBOARD = ROOT / "tests" / "no_tensorboard"  # its sitecustomize hides the package

pytestmark = pytest.mark.slow


def test_single_process_run_writes_the_run_directory(golden_runs):
    run_dir = golden_runs("llama")  # also compared bit for bit with the golden curve in test_golden.py
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for key in (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_device",
        "mfu",
        "mem_gb",
        "elapsed_s",
    ):
        assert all(r[key] is not None for r in train), key
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 10, 20]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert (run_dir / "checkpoints" / "step_00000020" / "COMPLETE").is_file()


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_dp2_matches_golden(golden_data, tmp_path, stage):
    """2 ranks x micro 2 x accum 2 == the golden 1 rank x micro 2 x accum 4, per step. Each ZeRO
    stage runs under one launcher here (0, 3: deepspeed; 1: torchrun; 2: mpirun); every stage
    under every pp = 1 layout: tests/test_health.py, tests/test_benchmark.py."""
    before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"zero.stage": stage}), "deepspeed", 2)
    assert_matches_golden(tmp_path, "llama")
    # DeepSpeed's CPU shm all-reduce buffers (66 MB of RAM per rank) are not left behind
    assert set(SHM.glob("deepspeed_allreduce_buffer_*")) <= before


def test_torchrun_dp2_matches_golden(golden_data, tmp_path):
    overrides = {"zero.stage": 1, "training.micro_batch": 4}
    run_pretrain(golden_run_overrides(tmp_path, golden_data, **overrides), "torchrun", 2)
    assert_matches_golden(tmp_path, "llama")


def test_mpirun_dp2_matches_golden(golden_data, tmp_path):
    """mpirun (mpich + mpi4py rank discovery) gives the golden per-step numbers, as torchrun and
    deepspeed do above: the three launchers agree."""
    run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"zero.stage": 2}), "mpirun", 2)
    assert_matches_golden(tmp_path, "llama")


def test_resume_at_step_10_is_bit_equal_to_the_golden_curve(golden_data, tmp_path):
    """...and with ``run.tensorboard=true`` both halves write TensorBoard scalars equal to
    ``metrics.jsonl`` (the tensorboard extra is in the dev extras)."""
    tb = {"run.tensorboard": "true"}
    first = run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"training.max_steps": 10}, **tb))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_pretrain(golden_run_overrides(tmp_path, golden_data, **tb))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000010" in second.stdout
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 21))  # no step logged twice
    assert_matches_golden(tmp_path, "llama", rel=SAME_ARITHMETIC)  # both halves, bitwise
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted((tmp_path / "tensorboard").glob("events.*")):  # one file per start
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars.update({e.step: e.value for e in acc.Scalars("loss")})
    assert scalars == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-7)  # stored as fp32


def test_tensorboard_without_the_package_is_one_error_line(golden_data, tmp_path):
    env = cpu_env() | {"PYTHONPATH": f"{NO_TENSORBOARD}{os.pathsep}{cpu_env()['PYTHONPATH']}"}
    proc = run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"run.tensorboard": "true"}), env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: run.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
        "(or set run.tensorboard=false)"
    ], proc.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_interrupted_save_leaves_latest_loadable(golden_runs, golden_data, tmp_path):
    """A half-written newer tag (no COMPLETE marker) is ignored by training.resume=auto."""
    shutil.copytree(golden_runs("llama") / "checkpoints", tmp_path / "checkpoints")
    partial = tmp_path / "checkpoints" / "step_00000030"
    partial.mkdir()
    (partial / "model_tp00_pp00_dp000.safetensors").write_bytes(b"truncated")
    proc = run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"training.max_steps": 21}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_00000020" in proc.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000021"


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_misspelled_key_is_one_line_error(tmp_path):
    line = _one_line_error(run_pretrain([f"run.dir={tmp_path}", "training.max_step=5"]))
    assert line == "error: unknown config key 'training.max_step'; did you mean 'training.max_steps'?"


def test_missing_data_path_is_one_line_error(tmp_path):
    line = _one_line_error(run_pretrain([f"run.dir={tmp_path}", f"data.dir={tmp_path / 'nope'}"]))
    assert f"data directory '{tmp_path / 'nope'}' does not exist" in line and "make data" in line


def test_empty_training_split_is_one_line_error(golden_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    manifest = json.loads((golden_data / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] == "val"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    for s in manifest["shards"]:
        (data / s["file"]).write_bytes((golden_data / s["file"]).read_bytes())
    line = _one_line_error(run_pretrain([f"run.dir={tmp_path / 'run'}", f"data.dir={data}"]))
    assert "has no training documents" in line and "non-empty corpus" in line


def test_indivisible_batch_is_one_line_error(golden_data, tmp_path):
    overrides = golden_run_overrides(tmp_path, golden_data, **{"training.micro_batch": 3})
    line = _one_line_error(run_pretrain(overrides))
    assert "training.global_batch (8) must be divisible by training.micro_batch (3) * dp (1)" in line


def test_diverging_loss_stops_with_a_clear_error(golden_data, tmp_path):
    """Under ``training.on_nonfinite=stop`` (the default ``skip``: tests/test_health.py)."""
    overrides = golden_run_overrides(
        tmp_path,
        golden_data,
        **{"optim.lr": 1e6, "optim.warmup_steps": 1, "optim.grad_clip": 0.0, "training.on_nonfinite": "stop"},
    )
    line = _one_line_error(run_pretrain(overrides))
    assert line.startswith("error: step ") and "not applied: non-finite" in line
    assert "lower optim.lr" in line and "training.resume=auto" in line
