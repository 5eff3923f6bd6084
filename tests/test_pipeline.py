"""Pipeline parallelism (DeepSpeed pipeline engine) composed with TP and ZeRO-1: the golden numbers.

Every run is compared with the golden curve (tests/golden) of its family, which is four
layers deep so pp=4 splits it, with clipping active (the pipeline's global norm matters).
"""

from __future__ import annotations

import pytest

from megalm.config import ConfigError, load_config
from megalm.parallel.layout import check_layout
from tests.golden import SAME_ARITHMETIC, assert_matches_golden, golden_run_overrides
from tests.launching import run_pretrain

TEN_STEPS = {"training.max_steps": 10}  # the golden's first 10 steps (its decay_steps is fixed)
FIRST_TEN = range(1, 11)
# DeepSpeed's pipeline engine with ZeRO-0 in fp32 clips without keeping the norm, so those runs
# log grad_norm null (megalm measures it itself only for pp = 1): their losses are compared.
NO_NORM = {"grad_norm": False}


@pytest.mark.slow
@pytest.mark.parametrize(("pp", "family"), [(2, "gpt2"), (4, "llama"), (2, "llama"), (4, "gpt2")])
def test_pipeline_losses_match_golden(golden_data, tmp_path, pp, family):
    """10 steps, global batch 8 = micro 2 x 4 micro-batches; grad clipping active (exact global norm)."""
    overrides = {**TEN_STEPS, "parallel.pp": pp}
    run_pretrain(golden_run_overrides(tmp_path, golden_data, family, **overrides), "torchrun", pp)
    assert_matches_golden(tmp_path, family, FIRST_TEN, **NO_NORM)


@pytest.mark.slow
def test_3d_tp2_pp2_dp2_sp_matches_golden(golden_data, tmp_path):
    """8 ranks, sequence parallel inside each pipeline stage (the deepspeed launcher with
    tp/pp layouts: tests/test_launch_matrix.py)."""
    overrides = {**TEN_STEPS, "parallel.tp": 2, "parallel.pp": 2, "zero.stage": 1, "training.micro_batch": 1}
    overrides["parallel.sequence_parallel"] = "true"
    run_pretrain(golden_run_overrides(tmp_path, golden_data, **overrides), "torchrun", 8)
    assert_matches_golden(tmp_path, "llama", FIRST_TEN)


@pytest.mark.slow
def test_resume_under_pp2_matches_golden(golden_data, tmp_path):
    pp2 = {"parallel.pp": 2}
    run_pretrain(golden_run_overrides(tmp_path, golden_data, **TEN_STEPS, **pp2), "torchrun", 2)
    second = run_pretrain(golden_run_overrides(tmp_path, golden_data, **pp2), "torchrun", 2)
    assert "resumed from" in second.stdout and "step_00000010" in second.stdout
    assert_matches_golden(tmp_path, "llama", **NO_NORM)  # steps 1-10 before, 11-20 after the resume


@pytest.mark.slow
def test_activation_checkpointing_gives_the_golden_losses(golden_data, tmp_path):
    """Full recompute every 2 blocks, with and without PP, changes no loss (bitwise without PP)."""
    recompute = {"training.recompute": "full", "training.recompute_interval": 2}
    proc = run_pretrain(golden_run_overrides(tmp_path / "plain", golden_data, **recompute))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches_golden(tmp_path / "plain", "llama", rel=SAME_ARITHMETIC)
    pipelined = {**TEN_STEPS, "parallel.pp": 2, "training.recompute": "full"}
    run_pretrain(golden_run_overrides(tmp_path / "pp", golden_data, **pipelined), "torchrun", 2)
    assert_matches_golden(tmp_path / "pp", "llama", FIRST_TEN, **NO_NORM)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.pp=2", "zero.stage=3"], 2, "DeepSpeed's pipeline engine supports ZeRO-1 only"),
        (["parallel.pp=2", "zero.stage=2"], 2, "use zero.stage=1 with pipeline parallelism"),
        (["parallel.pp=8", "model.n_layers=4"], 8, "parallel.pp (8) is larger than model.n_layers (4)"),
        (
            ["parallel.pp=2", "training.global_batch=10", "training.micro_batch=4"],
            4,
            "training.global_batch (10) must be divisible by training.micro_batch (4) * dp (2)",
        ),
        (["parallel.pp=2", "parallel.tp=2"], 6, "tp(2) * pp(2) * dp(1) != world_size(6)"),
    ],
)
def test_invalid_pipeline_combinations_fail_before_training(overrides, world, message):
    cfg = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        check_layout(cfg, world)
    assert message in str(e.value)


@pytest.mark.slow
def test_invalid_combination_is_one_line_error_from_the_cli(golden_data, tmp_path):
    proc = run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"parallel.pp": 2, "zero.stage": 3}))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "ZeRO-1 only" in proc.stderr


def test_recompute_benchmark_reports_less_saved_memory(tmp_path):
    import json
    import subprocess

    from tests.conftest import PYTHON, ROOT, scaled_timeout
    from tests.launching import cpu_env

    cmd = [
        PYTHON,
        str(ROOT / "launch" / "bench_recompute.py"),
        "--layers",
        "4",
        "--d-model",
        "64",
        "--seq",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=scaled_timeout(300))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "recompute.json").read_text())
    # Without recompute autograd keeps every block's internals; with it, one input per block.
    assert r["memory_ratio"] < 0.5 and r["results"]["full"]["step_s"] > 0
