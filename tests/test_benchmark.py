"""The throughput sweep: parsing, launch commands, outputs, and real CPU sweeps (slow)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalm.config import ConfigError, load_config
from megalm.perf.flops import param_count
from megalm.perf.memory import Recipe, activation_bytes, engine_fp32_state_bytes
from megalm.perf.sweep import SweepSettings, format_table, launch_command, parse_sweep, write_outputs
from megalm.train.engine import zero_bucket_elements
from megalm.train.launchers import RANK_VARS, job_env
from tests.conftest import PYTHON, ROOT, run_checkout, tiny_overrides


def test_parse_sweep_product_and_zip():
    assert parse_sweep(["a.b=1,2", "c.d=x,y"]) == [
        {"a.b": "1", "c.d": "x"},
        {"a.b": "1", "c.d": "y"},
        {"a.b": "2", "c.d": "x"},
        {"a.b": "2", "c.d": "y"},
    ]
    assert parse_sweep(["a.b=1,2", "c.d=x,y"], zipped=True) == [
        {"a.b": "1", "c.d": "x"},
        {"a.b": "2", "c.d": "y"},
    ]
    with pytest.raises(ConfigError, match="same number of values"):
        parse_sweep(["a.b=1,2", "c.d=x"], zipped=True)
    with pytest.raises(ConfigError, match="key.sub=v1,v2"):
        parse_sweep(["a.b"])


def test_launch_commands(tmp_path):
    s = SweepSettings("c.yaml", tmp_path)
    assert launch_command(s, ["x=1"], 1, tmp_path)[1:3] == ["-m", "megalm.perf.worker"]
    torchrun = launch_command(s, [], 4, tmp_path)
    assert Path(torchrun[0]).name == "torchrun" and torchrun[1:3] == ["--nproc_per_node", "4"]
    s.launcher = "deepspeed"
    ds = launch_command(s, [], 2, tmp_path)
    assert Path(ds[0]).name == "deepspeed" and "--module" in ds and ds[2] == "2"
    s.launcher = "srun"
    assert launch_command(s, [], 16, tmp_path)[:3] == ["srun", "--ntasks", "16"]
    s.launcher = "python"
    with pytest.raises(ConfigError, match="needs 2"):
        launch_command(s, [], 2, tmp_path)


def test_job_env_runs_this_checkout_and_hands_on_no_rank(monkeypatch, tmp_path):
    """A sweep started under torchrun (rank variables set, another checkout on PYTHONPATH)
    starts its jobs on this checkout's code, as fresh worlds, one OpenMP thread each."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in zip(RANK_VARS, ("1", "2", "1", "2", "10.0.0.1", "29500"), strict=True):
        monkeypatch.setenv(key, value)
    env = job_env(ROOT)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(tmp_path)]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["OMP_NUM_THREADS"] == "1"
    assert not set(RANK_VARS) & env.keys()
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert job_env(ROOT)["OMP_NUM_THREADS"] == "4"  # the user's choice stands


def test_outputs_include_failed_rows(tmp_path):
    ok = {"index": 0, "parallel.tp": "1", "nproc": 1, "status": "ok", "tokens_per_s_per_device": 100.0,
          "tflops_per_device": 0.01, "mfu": 0.2, "hfu": 0.2, "peak_mem_gb": 1.0, "step_s": 0.5,
          "forward_s": 0.1, "backward_s": 0.3, "optimizer_s": 0.1, "comm_s": 0.05}  # fmt: skip
    bad = {"index": 1, "parallel.tp": "3", "nproc": 3, "status": "failed", "error": "n_heads % tp"}
    paths = write_outputs([ok, bad], ["parallel.tp"], tmp_path)
    assert [p.name for p in paths] == ["results.csv", "results.json", "throughput.png", "step_time.png"]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "n_heads % tp"
    assert all(p.stat().st_size > 1000 for p in paths[2:])
    table = format_table([ok, bad], ["parallel.tp"])
    assert "20.0%" in table and "n_heads % tp" in table


def _benchmark(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        PYTHON,
        str(ROOT / "launch" / "benchmark.py"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        *args,
    ]
    # Four DeepSpeed-launched configurations of 2 ranks took 2-3 min on a quiet 2-core machine and
    # over 15 min with two CPU burners beside them (issue 20); the bound only catches a hang.
    return run_checkout(cmd, 2400)


def _fixed(tmp_path: Path, shards_dir: Path) -> list[str]:
    return [o for o in tiny_overrides(tmp_path / "unused", shards_dir) if not o.startswith("run.dir")]


def test_bad_sweep_key_with_a_model_preset_fails_before_launching(tmp_path):
    preset = str(ROOT / "configs" / "model" / "gpt3-125m.yaml")
    proc = _benchmark(["--out", str(tmp_path), "--model", preset, "--sweep", "training.micro_bach=1,2"])
    assert proc.returncode == 2 and "did you mean 'training.micro_batch'" in proc.stderr
    merged = (tmp_path / "base_config.yaml").read_text()
    assert "d_model: 768" in merged and not list(tmp_path.glob("config_*"))


@pytest.mark.slow
def test_sweep_tp_pp_micro_batch_on_cpu_with_an_impossible_configuration(tmp_path, shards_dir):
    """Issue 8, must-hold 3: four configurations varying tp, pp and micro-batch on 2 processes;
    tp=2 x pp=2 cannot fit 2 processes and is reported with the trainer's message."""
    out = tmp_path / "bench"
    sweep = ["parallel.tp=1,2,1,2", "parallel.pp=1,1,2,2", "training.micro_batch=1,2,2,1"]
    proc = _benchmark(["--out", str(out), "--zip", "--nproc", "2", "--steps", "2", "--sweep", *sweep,
                       "--set", *_fixed(tmp_path, shards_dir)])  # fmt: skip
    print(proc.stdout[-4000:])
    assert proc.returncode == 1, proc.stderr[-3000:]  # one configuration failed, the others ran
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "tp(2) * pp(2)" in rows[3]["error"] and "world_size(2)" in rows[3]["error"]
    for r in rows[:3]:
        assert r["tokens_per_s_per_device"] > 0 and r["mfu"] > 0 and r["peak_mem_gb"] > 0
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] > 0
        # The phases are disjoint parts of the step, and what they leave out is time in collectives
        # (pipeline sends/receives waiting for the other stage, gradient reductions). Each number is
        # a mean over steps and a maximum over ranks, so allow for noise on a loaded 2-core machine.
        parts = r["forward_s"] + r["backward_s"] + r["optimizer_s"]
        assert parts <= 1.25 * r["step_s"] and 0.7 * r["step_s"] <= parts + r["comm_s"]
        if not r["pipelined"]:  # no bubble: the phases hold most of the step
            assert 0.5 * r["step_s"] <= parts
        assert "6*N_mm + 12*L*T*d" in r["formula"]
    assert rows[0]["comm_s"] > 0  # dp=2 gradient all-reduce
    assert rows[1]["comm_s"] > 0 and rows[2]["comm_s"] > 0  # TP collectives, pipeline send/recv
    for name in ("results.csv", "throughput.png", "step_time.png"):
        assert (out / name).stat().st_size > 0
    assert "tp(2) * pp(2)" in proc.stdout and "MFU" in proc.stdout


@pytest.mark.slow
def test_measured_model_states_and_activations_match_the_memory_model(tmp_path, shards_dir):
    """Issue 8, must-hold 2: DP=2 under the DeepSpeed launcher, ZeRO 0-3: parameters + gradients
    + optimizer states within 5% of :func:`engine_fp32_state_bytes`, activations within 10% of
    :func:`activation_bytes` (measured 1.003 of it). Issue 20: the activation figure is the same
    at every ZeRO stage; ZeRO-3's weights, gathered while a layer saves them, are parameters."""
    out = tmp_path / "bench"
    fixed = _fixed(tmp_path, shards_dir)
    proc = _benchmark(["--out", str(out), "--dp", "2", "--launcher", "deepspeed", "--steps", "1",
                       "--sweep", "zero.stage=0,1,2,3", "--set", *fixed])  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*fixed, "model.vocab_size=512"]).model
    psi = param_count(cfg)
    act = activation_bytes(cfg, 2, recipe=Recipe.megalm(cfg, "fp32"))
    for r in rows:
        stage = int(r["zero.stage"])
        bucket = zero_bucket_elements(psi)
        predicted = engine_fp32_state_bytes(psi, 2, stage, reduce_bucket_elements=bucket)["total"]
        measured, measured_act = r["model_state_bytes"], r["activation_bytes_per_micro_batch"]
        print(f"zero {stage}: states measured {measured:,} predicted {predicted:,.0f} "
              f"({measured / predicted:.3f}); activations {measured_act:,} predicted {act:,.0f} "
              f"({measured_act / act:.3f})")  # fmt: skip
        assert measured == pytest.approx(predicted, rel=0.05)
        if stage == 3:  # the parameter-proportional part alone, without the gradient bucket
            assert measured - 4 * bucket == pytest.approx(predicted - 4 * bucket, rel=0.05)
        assert measured_act == pytest.approx(act, rel=0.10)
        assert measured_act == rows[0]["activation_bytes_per_micro_batch"]  # ZeRO shards no activation
