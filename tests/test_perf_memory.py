"""Memory model against the papers' formulas and hand-computed numbers, and against measurement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megalm.config import load_config
from megalm.model import GPT
from megalm.perf.measure import saved_activation_bytes
from megalm.perf.memory import (
    Recipe,
    StateBytes,
    activation_bytes,
    head_activation_bytes,
    layer_activation_bytes,
    zero_model_state_bytes,
)

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "model"


def test_zero_figure1_numbers():
    """Rajbhandari et al. 2020, Figure 1: 7.5B parameters, N_d = 64, K = 12:
    baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB per device."""
    psi, nd = 7.5e9, 64
    got = [zero_model_state_bytes(psi, nd, stage)["total"] / 1e9 for stage in (0, 1, 2, 3)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)
    # by hand: stage 2 = 2 Psi + (2 + 12) Psi / 64
    assert zero_model_state_bytes(psi, nd, 2)["total"] == 2 * psi + 14 * psi / 64
    fp32 = zero_model_state_bytes(100, 4, 1, StateBytes.fp32_adam())
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == (400, 400, 200)


def _paper_cfg(s=2048, h=12288, a=96):
    cfg = load_config(PRESETS / "gpt3-175b.yaml").model
    return dataclasses.replace(cfg, seq_len=s, d_model=h, n_heads=a, dropout=0.1)


@pytest.mark.parametrize("t", [1, 2, 8])
def test_korthikanti_table2(t):
    """Korthikanti et al. 2022, Table 2, per layer, 16-bit activations with dropout."""
    s, b, h, a = 2048, 1, 12288, 96
    cfg, r = _paper_cfg(s, h, a), Recipe.paper()
    sbh = s * b * h
    cases = {
        (False, "none"): sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        (True, "none"): sbh * (34 / t + 5 * a * s / (h * t)),
        (False, "selective"): sbh * (10 + 24 / t),
        (True, "selective"): sbh * 34 / t,
        (False, "full"): 2 * sbh,
    }
    for (sp, rc), want in cases.items():
        assert layer_activation_bytes(cfg, b, t, sp, rc, r) == pytest.approx(want, rel=1e-12), (sp, rc)
    if t == 1:  # no parallelism: s b h (34 + 5 a s / h)
        want = sbh * (34 + 5 * a * s / h)
        assert layer_activation_bytes(cfg, b, 1, False, "none", r) == pytest.approx(want)


def test_korthikanti_hand_numbers_gpt3_175b():
    """175B, s = 2048, b = 1, t = 8 with SP and selective recompute: 34 s b h / t =
    34 * 2048 * 12288 / 8 = 106,954,752 bytes per layer; x 96 layers = 10.27 GB; full
    recompute keeps 2 s b h = 50,331,648 bytes per layer."""
    cfg, r = _paper_cfg(), Recipe.paper()
    assert layer_activation_bytes(cfg, 1, 8, True, "selective", r) == 106_954_752
    assert layer_activation_bytes(cfg, 1, 1, False, "full", r) == 50_331_648
    # 1F1B with p = 8: the first stage holds 8 micro-batches of 12 layers = 96 layers' worth
    per_layer = layer_activation_bytes(cfg, 1, 8, True, "selective", r)
    assert activation_bytes(cfg, 1, 8, 8, True, "selective", r, n_micro=64) == 96 * per_layer
    assert activation_bytes(cfg, 1, 8, 8, True, "selective", r, n_micro=2) == 24 * per_layer


def _small(family: str, **kw):
    base = load_config(
        None,
        [
            f"model.family={family}",
            "model.vocab_size=512",
            "model.n_layers=3",
            "model.d_model=96",
            "model.n_heads=6",
            "model.n_kv_heads=2" if family == "llama" else "model.n_kv_heads=0",
            "model.seq_len=64",
            "model.kernels=torch",
        ],
    ).model
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_activation_model_matches_saved_tensors(family, batch):
    """megalm's recipe against the bytes autograd actually saves (issue 8: within 25%)."""
    cfg = _small(family)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    with saved_activation_bytes(model) as saved:
        loss = model(x, x)
    loss.backward()
    predicted = activation_bytes(cfg, batch, recipe=Recipe.megalm(cfg, "fp32"))
    ratio = predicted / saved["bytes"]
    print(f"{family} b={batch}: predicted {predicted:,.0f} measured {saved['bytes']:,} bytes ({ratio:.3f})")
    assert 0.9 <= ratio <= 1.1


def test_head_term_counts_fp32_logits():
    cfg = _small("llama")
    r = Recipe.megalm(cfg, "fp32")
    # final norm input + head input (2 s b h fp32; the norms save their input and per-row
    # statistics only) + fp32 logits over the padded vocab
    assert head_activation_bytes(cfg, 2, recipe=r) == 2 * 4 * 2 * 64 * 96 + 4 * 2 * 64 * 512
