"""The learning-rate schedule at named steps: linear warmup, cosine decay, min_lr, decay_steps.

Expected values are worked out by hand from ``lr = min + (max - min) (1 + cos(pi t)) / 2``
with ``t = (step - warmup) / (decay_steps - warmup)`` (0-based optimizer steps).
"""

from __future__ import annotations

import math

import pytest
import torch

from megalm.config import OptimConfig
from megalm.train.optim import lr_multiplier, make_scheduler
from tests.golden import load_golden

# lr 1e-3 -> min 1e-4 (multiplier 0.1), warmup 10 steps, cosine over steps 10..110.
CFG = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
SQRT_HALF = math.sqrt(2) / 2
NAMED = {
    0: 0.1,  # first warmup step: 1/10 of the peak, never 0
    4: 0.5,
    9: 1.0,  # last warmup step reaches the peak
    10: 1.0,  # cosine starts at the peak (t = 0)
    35: 0.1 + 0.45 * (1 + SQRT_HALF),  # t = 1/4
    60: 0.55,  # t = 1/2: halfway between peak and min
    85: 0.1 + 0.45 * (1 - SQRT_HALF),  # t = 3/4
    110: 0.1,  # decay_steps: min_lr
    111: 0.1,
    10_000: 0.1,  # min_lr for good, however long the run
}


@pytest.mark.parametrize(("step", "expected"), sorted(NAMED.items()))
def test_multiplier_at_named_steps(step, expected):
    assert lr_multiplier(step, CFG, max_steps=500) == pytest.approx(expected, rel=1e-12)


def test_decay_steps_zero_decays_over_max_steps_and_no_warmup_starts_at_the_peak():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=0)
    assert lr_multiplier(35, cfg, max_steps=60) == pytest.approx(0.55, rel=1e-12)  # t = 25/50
    assert lr_multiplier(60, cfg, max_steps=60) == pytest.approx(0.1, rel=1e-12)
    flat = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=100)
    assert lr_multiplier(0, flat, 100) == 1.0 and lr_multiplier(50, flat, 100) == pytest.approx(0.55)


def test_min_lr_equal_to_lr_is_constant_after_warmup():
    cfg = OptimConfig(lr=5e-4, min_lr=5e-4, warmup_steps=2, decay_steps=10)
    assert [lr_multiplier(s, cfg, 20) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_scheduler_gives_the_optimizer_the_named_values_step_by_step():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=CFG.lr)
    sched = make_scheduler(opt, CFG, max_steps=500)
    seen = {}
    for step in range(112):
        seen[step] = opt.param_groups[0]["lr"]  # the lr the optimizer step ``step`` uses
        opt.step()
        sched.step()
    for step, expected in NAMED.items():
        if step in seen:
            assert seen[step] == pytest.approx(CFG.lr * expected, rel=1e-12), step


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_golden_runs_logged_the_lr_of_the_step_they_took(family):
    """metrics.jsonl step s (1-based) records the lr of 0-based optimizer step s - 1."""
    golden = load_golden(family)
    c = golden["config"]
    cfg = OptimConfig(
        lr=c["optim.lr"],
        min_lr=c["optim.min_lr"],
        warmup_steps=c["optim.warmup_steps"],
        decay_steps=c["optim.decay_steps"],
    )
    assert (c["optim.warmup_steps"], c["optim.decay_steps"]) == (5, 20)
    for r in golden["steps"]:
        assert r["lr"] == pytest.approx(cfg.lr * lr_multiplier(r["step"] - 1, cfg, 20), rel=1e-12)
    assert golden["steps"][4]["lr"] == pytest.approx(cfg.lr)  # step 5 ends the 5-step warmup
