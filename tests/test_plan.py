"""The layout planner: Megatron's 175B layout in kind, memory refusals with numbers, the CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megalm.config import load_config
from megalm.perf.devices import DEVICES
from megalm.perf.plan import Layout, describe_memory, estimate, format_plan, layout_problem, plan

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "configs" / "model"


@pytest.fixture(scope="module")
def gpt3_175b_plan():
    cfg = load_config(PRESETS / "gpt3-175b.yaml").model
    return cfg, plan(cfg, 1024, DEVICES["a100"], global_batch=1536)


def test_175b_on_1024_a100_uses_tp_in_node_and_pp_across_nodes(gpt3_175b_plan):
    """Narayanan et al. 2021, Table 1: 175B on 1024 A100 trains with t = 8, p = 16 (TP inside a
    DGX node over NVLink, PP across nodes). The planner's best layouts agree in kind."""
    cfg, p = gpt3_175b_plan
    gpus = DEVICES["a100"].gpus_per_node
    for e in p.fits[:5]:
        lay = e.layout
        assert gpus % lay.tp == 0 and lay.tp >= 4, lay
        assert lay.pp > 1, lay
        assert lay.tp * lay.dp >= gpus, lay  # one stage fills whole nodes: PP hops between nodes
    published = Layout(tp=8, pp=16, dp=8, zero=0, micro_batch=1, sp=False, recompute="full")
    assert any(e.layout == published for e in p.fits)
    est = estimate(cfg, published, DEVICES["a100"], 1536)
    assert est.memory < 72e9 and 0.3 < est.mfu < 0.8


def test_175b_refuses_layouts_that_do_not_fit_with_numbers(gpt3_175b_plan):
    cfg, p = gpt3_175b_plan
    assert p.too_big and all(e.memory > p.usable_bytes for e in p.too_big)
    # no pipeline, ZeRO-1: 175B / 8 in bf16 weights and gradients are 43.7 + 43.7 GB per device
    zero1 = Layout(tp=8, pp=1, dp=128, zero=1, micro_batch=1, sp=True, recompute="full")
    refused = [e for e in p.too_big if e.layout == zero1]
    assert refused and refused[0].states["params"] == pytest.approx(43.7e9, rel=2e-3)
    assert not any(e.layout.pp == 1 and e.layout.zero < 2 for e in p.fits)  # PP or ZeRO-2/3 is needed
    text = format_plan(p)
    assert "out of memory" in text and "params 43.7 + grads 43.7" in describe_memory(refused[0])
    assert "zero.stage=2 with parallel.pp=2: DeepSpeed's pipeline engine supports ZeRO-1 only" in text


def test_layout_rules():
    cfg = load_config(PRESETS / "llama-8b.yaml").model
    ok = Layout(8, 2, 4, 1, 1, True, "none")
    assert layout_problem(cfg, ok, 64, 8) == ("", "")
    assert layout_problem(cfg, Layout(16, 1, 4, 1, 1, True, "none"), 64, 8)[0] == "tp crosses nodes"
    # uneven stages are built by the trainer (DeepSpeed balances blocks), so the planner allows them
    assert layout_problem(cfg, Layout(8, 3, 4, 1, 1, True, "none"), 48, 8) == ("", "")
    assert layout_problem(cfg, Layout(1, 64, 2, 1, 1, False, "none"), 64, 8)[0] == "pp > layers"
    assert layout_problem(cfg, Layout(8, 2, 4, 2, 1, True, "none"), 64, 8)[0] == "zero with pp"
    assert layout_problem(cfg, Layout(8, 2, 4, 1, 32, True, "none"), 64, 8)[0] == "batch"


def test_more_memory_or_recompute_never_hurts_fit():
    cfg = load_config(PRESETS / "llama-70b.yaml").model
    lay = dict(tp=8, pp=4, dp=2, zero=1, micro_batch=1, sp=True)
    none, full = (estimate(cfg, Layout(**lay, recompute=r), DEVICES["h100"], 64) for r in ("none", "full"))
    assert full.activations < none.activations and full.step_s > none.step_s


def test_plan_cli_prints_best_and_rejections(capsys):
    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", str(PRESETS / "llama-8b.yaml"), "--devices", "16", "--device", "h100",
                     "--seq-len", "4096", "--global-batch", "64", "--top", "3"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "best of" in out and "rejected:" in out
    assert "peak 989 TFLOP/s dense bf16" in out and "6*N_mm + 6*L*T*d" in out
    assert mod.main(["--model", str(PRESETS / "gpt3-175b.yaml"), "--devices", "8", "--device", "h100"]) == 1
    assert "no layout fits" in capsys.readouterr().out
