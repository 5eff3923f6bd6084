"""The step benchmark runs and both paths compute the same losses."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_bench_step_writes_json_and_paths_agree(shards_dir, tmp_path):
    cmd = [
        PYTHON,
        str(ROOT / "launch" / "bench_step.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
        f"data.dir={shards_dir}",
        "model.n_layers=2",
        "model.d_model=64",
        "model.n_heads=4",
        "model.seq_len=64",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio megalm / bare" in proc.stdout
    r = json.loads((tmp_path / "bench_step.json").read_text())
    assert len(r["step_times_s"]["megalm"]) == len(r["step_times_s"]["bare"]) == 2
    assert r["max_loss_rel_diff"] < 1e-5  # same model, weights, batch, optimizer -> same losses
    assert r["ratio_megalm_over_bare"] > 0
