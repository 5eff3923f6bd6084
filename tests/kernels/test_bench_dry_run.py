"""The kernel benchmark's CPU dry run and gpu_check.sh's no-CUDA path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bench_dry_run_checks_shapes_and_flops(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench_kernels.py"), "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["meta"]["dry_run"] is True
    rows = {r["name"]: r for r in report["results"]}
    attn = rows["attn causal T=4096"]
    b, h, t, d = (attn["params"][k] for k in ("b", "hq", "t", "d"))
    assert attn["work_fwd"] == 4 * b * t * t * h * d / 2  # causal halves the forward
    assert attn["work_bwd"] == 2.5 * attn["work_fwd"]
    assert attn["meta_output_shapes"] == [[b, h, t, d]]
    assert {r["op"] for r in report["results"]} == {
        "attention",
        "softmax",
        "rms_norm",
        "layer_norm",
        "cross_entropy",
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the real check")
def test_gpu_check_without_cuda_runs_the_dry_run_and_exits_0(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "bench_kernels_dry_run.json").exists()
