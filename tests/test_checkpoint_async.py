"""Asynchronous saves (``training.async_save=true``): the same tags as synchronous saves, and a
SIGKILL in the middle of a background write leaves the previous ``latest`` loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalm.checkpoint.writer import complete_tags
from tests.conftest import PYTHON, ROOT, run_checkout, tiny_overrides
from tests.launching import CONFIG, run_pretrain, step_losses

pytestmark = pytest.mark.slow

SAVES = {"training.max_steps": 4, "training.save_interval": 2, "training.keep_checkpoints": 3}


def _hashes(tag: Path) -> dict[str, str]:
    files = json.loads((tag / "manifest.json").read_text())["files"]
    return {k: v["sha256"] for k, v in files.items() if k.startswith(("model_", "optim_"))}


def test_async_saves_write_the_same_tags_as_synchronous_saves(shards_dir, tmp_path):
    sync, background = tmp_path / "sync", tmp_path / "async"
    assert run_pretrain(tiny_overrides(sync, shards_dir, **SAVES)).returncode == 0
    proc = run_pretrain(tiny_overrides(background, shards_dir, **SAVES, **{"training.async_save": "true"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saving " in proc.stdout and "in the background" in proc.stdout
    assert complete_tags(background / "checkpoints") == ["step_00000002", "step_00000004"]
    for tag in ("step_00000002", "step_00000004"):
        a, b = sync / "checkpoints" / tag, background / "checkpoints" / tag
        assert _hashes(a) == _hashes(b) and len(_hashes(a)) == 2
        rng_a, rng_b = (torch.load(t / "rng" / "rank_00000.pt", weights_only=False) for t in (a, b))
        assert torch.equal(rng_a["torch"], rng_b["torch"])  # torch.save bytes differ (a random id)
    assert step_losses(sync) == step_losses(background)


# Runs pretraining with the checkpoint writer wrapped so the process SIGKILLs itself after the
# background writer of tag step_00000004 wrote its first file (the model) and before the next.
KILL_MID_WRITE = """
import os, signal, sys
import megalm.checkpoint.writer as writer
real = writer.write_file
def write_file(path, data):
    entry = real(path, data)
    if "step_00000004" in str(path) and path.name.startswith("model_"):
        os.kill(os.getpid(), signal.SIGKILL)
    return entry
writer.write_file = write_file
sys.argv = ["pretrain.py", *sys.argv[1:]]
from launch.pretrain import main
sys.exit(main())
"""


def test_sigkill_during_a_background_write_leaves_the_previous_latest_loadable(shards_dir, tmp_path):
    over = tiny_overrides(
        tmp_path, shards_dir, **{**SAVES, "training.max_steps": 6, "training.async_save": "true"}
    )
    killed = run_checkout([PYTHON, "-c", KILL_MID_WRITE, "--config", CONFIG, *over], 600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    partial = ckpt / "step_00000004"
    assert (
        list(partial.glob("model_*.safetensors")) and not (partial / "COMPLETE").exists()
    )  # killed mid-write
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    before = step_losses(tmp_path)
    resumed = run_pretrain(over)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt / 'step_00000002'} at step 2" in resumed.stdout
    after = step_losses(tmp_path)
    assert [after[s] for s in (3, 4)] == [before[s] for s in (3, 4)]  # bitwise: same layout
    assert complete_tags(ckpt) == ["step_00000002", "step_00000004", "step_00000006"]


def test_checkpoint_benchmark_writes_its_table_and_json(shards_dir, tmp_path):
    """The benchmark runs both modes on the same state (numbers: docs/checkpoints.md, not asserted)."""
    over = tiny_overrides(tmp_path / "run", shards_dir, **{"training.global_batch": 2})
    proc = run_checkout(
        [
            PYTHON,
            str(ROOT / "launch" / "bench_checkpoint.py"),
            "--config",
            CONFIG,
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
            *over,
        ],
        600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio async / sync blocked = " in proc.stdout
    r = json.loads((tmp_path / "bench_checkpoint.json").read_text())
    assert set(r["seconds"]) == {"sync_blocked", "async_blocked", "async_published"}
    assert r["median_s"]["async_published"] >= r["median_s"]["async_blocked"] > 0
    assert complete_tags(tmp_path / "run" / "checkpoints")[-2:] == ["step_00001001", "step_00001002"]
