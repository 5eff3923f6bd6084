"""End-to-end training through launch/pretrain.py: layouts, ZeRO stages, resume, errors.

These start real processes (plain python, ``deepspeed --num_gpus 2``, ``torchrun``)
on CPU with gloo, exactly as a user would.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides
from tests.launching import assert_losses_equal, run_pretrain, step_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_run(shards_dir, tmp_path_factory) -> Path:
    """20 steps, one process, global batch 8 = micro 2 x accum 4."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_pretrain(tiny_overrides(run_dir, shards_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_single_process_run_writes_the_run_directory(reference_run):
    records = read_metrics(reference_run / "metrics.jsonl")
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
    assert (reference_run / "loss.png").stat().st_size > 10_000
    assert (reference_run / "config.yaml").is_file()
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert (reference_run / "checkpoints" / "step_00000020" / "COMPLETE").is_file()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_dp2_equals_single_process(reference_run, shards_dir, tmp_path, stage):
    """2 ranks x micro 2 x accum 2 == 1 rank x micro 2 x accum 4, per step, for every ZeRO stage."""
    run_dir = tmp_path / f"zero{stage}"
    run_pretrain(tiny_overrides(run_dir, shards_dir, **{"zero.stage": stage}), "deepspeed", 2)
    assert_losses_equal(step_losses(reference_run), step_losses(run_dir), range(1, 21))


def test_torchrun_dp2_equals_single_process(reference_run, shards_dir, tmp_path):
    run_pretrain(
        tiny_overrides(tmp_path, shards_dir, **{"zero.stage": 1, "training.micro_batch": 4}), "torchrun", 2
    )
    assert_losses_equal(step_losses(reference_run), step_losses(tmp_path), range(1, 21))


def test_mpirun_dp2_equals_single_process(reference_run, shards_dir, tmp_path):
    """mpirun (mpich + mpi4py rank discovery) gives the same per-step losses as the single
    process, as torchrun and deepspeed do above: the three launchers agree."""
    run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"zero.stage": 1}), "mpirun", 2)
    assert_losses_equal(step_losses(reference_run), step_losses(tmp_path), range(1, 21))


def test_resume_at_step_10_equals_uninterrupted_run(reference_run, shards_dir, tmp_path):
    first = run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 10}))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_pretrain(tiny_overrides(tmp_path, shards_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000010" in second.stdout
    straight, resumed = step_losses(reference_run), step_losses(tmp_path)
    assert [resumed[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]  # bitwise
    assert sorted(resumed) == list(range(1, 21))  # no step logged twice


def test_interrupted_save_leaves_latest_loadable(reference_run, shards_dir, tmp_path):
    """A half-written newer tag (no COMPLETE marker) is ignored by training.resume=auto."""
    import shutil

    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    partial = tmp_path / "checkpoints" / "step_00000030"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc = run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 21}))
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


def test_empty_training_split_is_one_line_error(shards_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] == "val"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    for s in manifest["shards"]:
        (data / s["file"]).write_bytes((shards_dir / s["file"]).read_bytes())
    line = _one_line_error(run_pretrain([f"run.dir={tmp_path / 'run'}", f"data.dir={data}"]))
    assert "has no training documents" in line and "non-empty corpus" in line


def test_indivisible_batch_is_one_line_error(shards_dir, tmp_path):
    line = _one_line_error(run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"training.micro_batch": 3})))
    assert "training.global_batch (8) must be divisible by training.micro_batch (3) * dp (1)" in line


def test_diverging_loss_stops_with_a_clear_error(shards_dir, tmp_path):
    """Under ``training.on_nonfinite=stop`` (the default ``skip``: tests/test_health.py)."""
    overrides = tiny_overrides(
        tmp_path,
        shards_dir,
        **{"optim.lr": 1e6, "optim.warmup_steps": 1, "optim.grad_clip": 0.0, "training.on_nonfinite": "stop"},
    )
    line = _one_line_error(run_pretrain(overrides))
    assert line.startswith("error: step ") and "not applied: non-finite" in line
    assert "lower optim.lr" in line and "training.resume=auto" in line
