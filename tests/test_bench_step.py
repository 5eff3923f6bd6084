"""The step benchmark runs the trainer's step and a bare loop on the same work, and reports
numbers that agree with each other."""

from __future__ import annotations

import json
import statistics

import pytest

from megalm.config import load_config
from megalm.data import load_manifest
from megalm.perf.flops import model_flops_per_token
from tests.conftest import PYTHON, ROOT, run_checkout

pytestmark = pytest.mark.slow

OVERRIDES = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.seq_len=64",
             "training.global_batch=4", "training.micro_batch=2", "optim.warmup_steps=1"]  # fmt: skip


def test_bench_step_paths_compute_the_same_losses_and_consistent_numbers(shards_dir, tmp_path):
    """Three paths side by side: the trainer's step eager and compiled (``--compile``), the bare loop."""
    overrides = [f"data.dir={shards_dir}", *OVERRIDES]
    cmd = [PYTHON, str(ROOT / "launch" / "bench_step.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--steps", "3", "--warmup", "1", "--compile", "--out", str(tmp_path), *overrides]  # fmt: skip
    proc = run_checkout(cmd, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench_step.json").read_text())

    # Same model, weights, batches and optimizer: the same losses at every step (warm-up included),
    # and the optimizer moved the weights (the losses change from step to step).
    megalm, bare = r["losses"]["megalm"], r["losses"]["bare"]
    assert len(megalm) == len(bare) == 4
    assert megalm == pytest.approx(bare, rel=1e-5)
    assert r["max_loss_rel_diff"] == max(abs(a - b) / abs(b) for a, b in zip(megalm, bare, strict=True))
    assert len(set(megalm)) == 4
    compiled = r["losses"]["compiled"]
    assert compiled == pytest.approx(megalm, rel=1e-5)  # training.compile=true: the same losses
    assert r["max_loss_rel_diff_compiled"] == max(
        abs(a - b) / abs(b) for a, b in zip(compiled, megalm, strict=True)
    )

    # The summary numbers follow from the recorded step times and the model's FLOPs per token.
    vocab = load_manifest(shards_dir).vocab_size
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, f"model.vocab_size={vocab}"])
    tokens = cfg.training.global_batch * cfg.model.seq_len
    assert r["tokens_per_step"] == tokens
    for path in ("megalm", "bare", "compiled"):
        assert len(r["step_times_s"][path]) == 3
        median = statistics.median(r["step_times_s"][path])
        assert r["median_step_s"][path] == pytest.approx(median, rel=1e-12)
        assert r["tokens_per_s"][path] == pytest.approx(tokens / median, rel=1e-12)
        assert r["tflops"][path] == pytest.approx(tokens * model_flops_per_token(cfg.model) / median / 1e12)
    ratio = r["median_step_s"]["megalm"] / r["median_step_s"]["bare"]
    assert r["ratio_megalm_over_bare"] == pytest.approx(ratio, rel=1e-12)
    assert f"ratio megalm / bare = {ratio:.3f}" in proc.stdout
    speedup = r["tokens_per_s"]["compiled"] / r["tokens_per_s"]["megalm"]
    assert r["ratio_compiled_over_eager"] == pytest.approx(speedup, rel=1e-12)
    assert f"ratio compiled / eager tokens/s = {speedup:.3f}" in proc.stdout
