"""The megalm-vs-transformers benchmark runs both families and both sides train identically."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PYTHON, ROOT, run_checkout

pytestmark = pytest.mark.slow


def test_bench_hf_sides_compute_the_same_losses(tmp_path):
    cmd = [
        PYTHON, str(ROOT / "launch" / "bench_hf.py"),
        "--steps", "2", "--warmup", "1", "--vocab", "300", "--profile", "1", "--top", "3",
        "--out", str(tmp_path),
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
        "model.seq_len=32", "training.micro_batch=2",
    ]  # fmt: skip
    proc = run_checkout(cmd, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("speed ratio megalm / transformers") == 2
    results = json.loads((tmp_path / "bench_hf.json").read_text())["results"]
    assert [r["family"] for r in results] == ["llama", "gpt2"]
    for r in results:
        ours, theirs = r["losses"]["megalm"], r["losses"]["transformers"]
        assert len(ours) == len(theirs) == 3
        # same weights, batches and AdamW: the losses agree step after step (optimizer included)
        assert r["max_loss_rel_diff"] < 1e-5, (ours, theirs)
        assert len(set(ours)) == 3  # the steps changed the weights
        assert len(r["step_times_s"]["megalm"]) == len(r["step_times_s"]["transformers"]) == 2
        assert r["speed_ratio_megalm_over_transformers"] > 0
        assert all(len(r["profile"][side]) == 3 for side in ("megalm", "transformers"))
    assert results[0]["model"]["n_kv_heads"] == 2 and results[1]["model"]["n_kv_heads"] == 0


def test_bench_hf_rejects_bad_arguments(tmp_path):
    cmd = [PYTHON, str(ROOT / "launch" / "bench_hf.py"), "--out", str(tmp_path), "model.n_layer=2"]
    proc = run_checkout(cmd, 120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "model.n_layers" in proc.stderr
