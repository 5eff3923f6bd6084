"""A short bf16 training run on CUDA (skipped on machines without a GPU)."""

from __future__ import annotations

import pytest
import torch

from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides
from tests.launching import run_pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_cuda_run_learns_and_reports_mfu(shards_dir, tmp_path):
    proc = run_pretrain(
        tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 30, "training.eval_interval": 30}),
        cuda=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| bf16" in proc.stdout
    assert "dense bf16 datasheet peak" in proc.stdout or "measured bf16 matmul" in proc.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5
    assert all(0 < r["mfu"] < 1 for r in records if "mfu" in r)
