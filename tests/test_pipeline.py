"""Pipeline parallelism (DeepSpeed pipeline engine) composed with TP and ZeRO-1: losses equal pp=1."""

from __future__ import annotations

import pytest

from megalm.config import ConfigError, load_config
from megalm.parallel.layout import check_layout
from tests.conftest import tiny_overrides
from tests.launching import assert_losses_equal, run_pretrain, step_losses

PP_MODEL = {
    "model.n_layers": 4,
    "training.max_steps": 10,
    "optim.grad_clip": 0.3,
    "training.sample_tokens": 0,
}


@pytest.fixture(scope="module")
def references(shards_dir, tmp_path_factory) -> dict[str, object]:
    """pp=1 runs of both families, 20 steps (the first 10 compare with the 10-step pipelined runs;
    decay_steps is fixed, so the schedule is the same)."""
    out = {}
    for family in ("llama", "gpt2"):
        run_dir = tmp_path_factory.mktemp(f"pp1-{family}")
        proc = run_pretrain(
            tiny_overrides(
                run_dir, shards_dir, **{**PP_MODEL, "model.family": family, "training.max_steps": 20}
            )
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[family] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("pp", "family"), [(2, "gpt2"), (4, "llama"), (2, "llama"), (4, "gpt2")])
def test_pipeline_losses_equal_pp1(references, shards_dir, tmp_path, pp, family):
    """10 steps, global batch 8 = micro 2 x 4 micro-batches; grad clipping active (exact global norm)."""
    run_pretrain(
        tiny_overrides(tmp_path, shards_dir, **{**PP_MODEL, "model.family": family, "parallel.pp": pp}),
        "torchrun",
        pp,
    )
    assert_losses_equal(step_losses(references[family]), step_losses(tmp_path), range(1, 11))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_3d_tp2_pp2_dp2_equals_single_process(references, shards_dir, tmp_path, launcher):
    overrides = {**PP_MODEL, "parallel.tp": 2, "parallel.pp": 2, "zero.stage": 1, "training.micro_batch": 1}
    if launcher == "deepspeed":
        overrides["parallel.sequence_parallel"] = "true"
    run_pretrain(tiny_overrides(tmp_path, shards_dir, **overrides), launcher, 8)
    assert_losses_equal(step_losses(references["llama"]), step_losses(tmp_path), range(1, 11))


@pytest.mark.slow
def test_resume_under_pp2_is_exact(references, shards_dir, tmp_path):
    run_pretrain(tiny_overrides(tmp_path, shards_dir, **{**PP_MODEL, "parallel.pp": 2}), "torchrun", 2)
    second = run_pretrain(
        tiny_overrides(tmp_path, shards_dir, **{**PP_MODEL, "parallel.pp": 2, "training.max_steps": 20}),
        "torchrun",
        2,
    )
    assert "resumed from" in second.stdout and "step_00000010" in second.stdout
    assert_losses_equal(step_losses(references["llama"]), step_losses(tmp_path), range(11, 21))


@pytest.mark.slow
def test_activation_checkpointing_gives_identical_losses(references, shards_dir, tmp_path):
    """Full recompute every 2 blocks, with and without PP, changes no loss (bitwise without PP)."""
    proc = run_pretrain(
        tiny_overrides(
            tmp_path / "plain",
            shards_dir,
            **{
                **PP_MODEL,
                "training.max_steps": 20,
                "training.recompute": "full",
                "training.recompute_interval": 2,
            },
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = step_losses(references["llama"])
    assert [step_losses(tmp_path / "plain")[s] for s in range(1, 21)] == [ref[s] for s in range(1, 21)]
    run_pretrain(
        tiny_overrides(
            tmp_path / "pp", shards_dir, **{**PP_MODEL, "parallel.pp": 2, "training.recompute": "full"}
        ),
        "torchrun",
        2,
    )
    assert_losses_equal(ref, step_losses(tmp_path / "pp"), range(1, 11))


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
def test_invalid_combination_is_one_line_error_from_the_cli(shards_dir, tmp_path):
    proc = run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"parallel.pp": 2, "zero.stage": 3}))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "ZeRO-1 only" in proc.stderr


def test_recompute_benchmark_reports_less_saved_memory(tmp_path):
    import json
    import subprocess

    from tests.conftest import PYTHON, ROOT, subprocess_env

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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "recompute.json").read_text())
    # Without recompute autograd keeps every block's internals; with it, one input per block.
    assert r["memory_ratio"] < 0.5 and r["results"]["full"]["step_s"] > 0
