"""model.family=lstm: the article's baseline through megalm's loop, data, checkpoints and launchers
(data parallelism with ZeRO-2 equals one process), refused under TP/PP with one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megalm.config import ConfigError, ModelConfig, load_config
from megalm.model import build_model
from megalm.model.lstm import LSTMLM
from megalm.parallel.layout import check_layout
from megalm.perf.flops import model_flops_per_token, param_count
from megalm.train.metrics import read_metrics
from tests.conftest import tiny_overrides
from tests.launching import assert_losses_equal, run_pretrain, run_script, step_losses

LSTM = {"model.family": "lstm", "model.d_model": 96, "model.n_layers": 2, "training.max_steps": 10}


@pytest.mark.parametrize("tied", [None, True])
def test_param_count_and_flops_match_the_module(tied):
    cfg = ModelConfig(family="lstm", vocab_size=97, n_layers=2, d_model=48, tie_embeddings=tied)
    model = build_model(cfg, init_seed=0)
    assert isinstance(model, LSTMLM) and param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert model_flops_per_token(cfg) == 6 * (2 * 8 * 48 * 48 + 128 * 48)  # 6 N_mm, no attention term


def test_initial_loss_is_near_uniform_and_training_lowers_it():
    cfg = ModelConfig(family="lstm", vocab_size=200, n_layers=2, d_model=64, seq_len=32, dropout=0.1)
    model = build_model(cfg, init_seed=1)
    x = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(0))
    first = model(x[:, :-1], x[:, 1:])
    assert abs(first.item() - math.log(200)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first.item() - 1.0
    assert model.eval()(x[:, :-1]).shape == (4, 32, 200)  # logits over the real vocabulary


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.tp=2", "parallel.tp=2 with model.family=lstm: an LSTM layer has no tensor-parallel split"),
        (
            "parallel.pp=2",
            "parallel.pp=2 with model.family=lstm: the LSTM baseline is not split into pipeline",
        ),
        ("training.recompute=full", "training.recompute=full with model.family=lstm"),
    ],
)
def test_layouts_the_lstm_cannot_take_are_refused_with_a_reason(override, message):
    cfg = load_config(
        None, ["model.family=lstm", "training.global_batch=8", "training.micro_batch=2", override]
    )
    with pytest.raises(ConfigError, match=message):
        check_layout(cfg, 4)


@pytest.fixture(scope="module")
def lstm_run(shards_dir, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("lstm")
    proc = run_pretrain(tiny_overrides(run_dir, shards_dir, **LSTM))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


@pytest.mark.slow
def test_lstm_trains_through_the_loop_with_checkpoints_and_a_sample(lstm_run):
    run_dir, stdout = lstm_run
    records = read_metrics(run_dir / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.15  # 10 steps: 6.239 -> 5.975 measured
    assert all(r["mfu"] is not None for r in records if "loss" in r)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert "--- sample ---" in stdout and "model  | lstm" in stdout


@pytest.mark.slow
def test_lstm_deepspeed_dp2_zero2_equals_one_process(lstm_run, shards_dir, tmp_path):
    """2 ranks x micro 2 x accum 2 with ZeRO-2 == 1 rank x micro 2 x accum 4, per step."""
    run_pretrain(tiny_overrides(tmp_path, shards_dir, **LSTM, **{"zero.stage": 2}), "deepspeed", 2)
    assert_losses_equal(step_losses(lstm_run[0]), step_losses(tmp_path), range(1, 11))


@pytest.mark.slow
def test_evaluate_reproduces_the_lstm_val_loss(lstm_run, tmp_path):
    run_dir, _ = lstm_run
    out = tmp_path / "eval.json"
    proc = run_script("evaluate.py", ["--checkpoint", str(run_dir), "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r][-1]["val_loss"]
    assert abs(json.loads(out.read_text())["loss"] - val) <= 1e-5
