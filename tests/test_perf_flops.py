"""Presets against published parameter counts; FLOPs/MFU/HFU against published formulas and figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megalm.config import load_config
from megalm.perf.devices import DEVICES, known_device
from megalm.perf.flops import (
    hardware_flops_per_token,
    model_flops_per_token,
    narayanan_flops_per_iteration,
    narayanan_training_days,
    param_count,
    utilization,
)
from megalm.perf.presets import compose

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "model"

# Published sizes. GPT-3: Brown et al. 2020, Table 2.1, rounded to two or three significant
# digits there, so the tolerance is 2% (our count pads the 50257-token vocabulary to 50304 and
# includes biases, norms and learned positions). Llama: exact parameter counts of the released
# checkpoints (Llama 3.2 1B model card: 1.23B; Llama 3 8B: 8.03B; Llama 3 70B: 70.6B; the exact
# integers are the sums over the released safetensors), tolerance 0.01%.
PUBLISHED = {
    "gpt3-125m": (125e6, 0.02),
    "gpt3-350m": (350e6, 0.02),
    "gpt3-760m": (760e6, 0.02),
    "gpt3-1.3b": (1.3e9, 0.02),
    "gpt3-2.7b": (2.7e9, 0.02),
    "gpt3-6.7b": (6.7e9, 0.02),
    "gpt3-13b": (13e9, 0.02),
    "gpt3-175b": (175e9, 0.02),
    "llama-1b": (1_235_814_400, 1e-4),
    "llama-8b": (8_030_261_248, 1e-4),
    "llama-70b": (70_553_706_496, 1e-4),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    cfg = load_config(PRESETS / f"{name}.yaml").model
    published, tol = PUBLISHED[name]
    n = param_count(cfg)
    print(f"{name}: {n:,} vs published {published:,.0f} ({n / published - 1:+.2%})")
    assert abs(n / published - 1) <= tol


def test_every_preset_file_is_checked():
    assert {p.stem for p in PRESETS.glob("*.yaml")} == set(PUBLISHED)


def test_preset_merges_into_a_full_config(tmp_path):
    root = PRESETS.parent.parent
    tree = compose(root / "configs" / "tiny.yaml", PRESETS / "gpt3-125m.yaml")
    assert tree["model"]["d_model"] == 768 and tree["training"]["max_steps"] == 300
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: 3\n")
    with pytest.raises(ValueError, match="only a 'model:' section"):
        compose(root / "configs" / "tiny.yaml", bad)


def _gpt3_175b_narayanan():
    """GPT-3 175B as in Narayanan et al. 2021, Table 1: V = 51200 (their padded vocabulary)."""
    cfg = load_config(PRESETS / "gpt3-175b.yaml").model
    return dataclasses.replace(cfg, vocab_size=51200)


def test_full_recompute_hardware_flops_equal_narayanan_eq3():
    """Narayanan et al. 2021, eq. 3 for GPT-3 175B at global batch 1536, s = 2048:
    96 * 1536 * 2048 * 96 * 12288^2 * (1 + 2048/73728 + 51200/18874368) = 4.5110e18 FLOPs."""
    cfg = _gpt3_175b_narayanan()
    B, s = 1536, 2048
    ours = hardware_flops_per_token(cfg, "full") * B * s
    eq3 = narayanan_flops_per_iteration(B, s, 96, 12288, 51200)
    assert ours == pytest.approx(eq3, rel=1e-12)
    assert eq3 == pytest.approx(4.5110e18, rel=1e-4)
    assert hardware_flops_per_token(cfg, "none") == model_flops_per_token(cfg)


def test_narayanan_eq4_training_time_of_gpt3_175b_is_34_days():
    """Narayanan et al. 2021, sec. 5.1: 175B on 300B tokens, 1024 A100 at 140 TFLOP/s -> ~34 days."""
    assert narayanan_training_days(175e9, 300e9, 1024, 140e12) == pytest.approx(34, abs=0.5)


def test_gqa_and_swiglu_counts_by_hand():
    """Llama 3 8B: per layer wq, wo 4096^2; wk, wv 4096 x 1024 (8 of 32 heads); SwiGLU 3 x 4096 x 14336."""
    cfg = load_config(PRESETS / "llama-8b.yaml").model
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    n_mm = 32 * per_layer + 128256 * 4096
    attn = 12 * 32 * 8192 * 4096
    assert model_flops_per_token(cfg) == 6 * n_mm + attn
    assert model_flops_per_token(cfg, causal=True) == 6 * n_mm + attn / 2
    assert hardware_flops_per_token(cfg, "selective") == 6 * n_mm + attn + attn / 3
    assert hardware_flops_per_token(cfg, "full") == 8 * n_mm - 2 * 128256 * 4096 + attn * 4 / 3


def test_device_peaks_are_dense_bf16():
    """A100 312, H100/H200 989 TFLOP/s: the dense figures, not the 2:4-sparsity 624/1979."""
    assert DEVICES["a100"].peak_flops == 312e12
    assert DEVICES["h100"].peak_flops == 989e12
    assert DEVICES["h200"].peak_flops == 989e12


def test_mfu_and_hfu_by_hand():
    cfg = load_config(PRESETS / "gpt3-1.3b.yaml").model
    f = model_flops_per_token(cfg)
    u = utilization(cfg, tokens_per_s=8 * 40_000, devices=8, peak_flops=989e12, peak_source="H200",
                    recompute="full")  # fmt: skip
    assert u.tokens_per_s_per_device == 40_000
    assert u.mfu == pytest.approx(40_000 * f / 989e12)
    assert u.hfu == pytest.approx(40_000 * hardware_flops_per_token(cfg, "full") / 989e12)
    assert u.hfu > u.mfu > u.mfu_causal
    assert "6*N_mm + 12*L*T*d" in u.formula() and "989.000 TFLOP/s (H200)" in u.formula()


@pytest.mark.parametrize(
    ("cuda_name", "key"),
    [
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A800-SXM4-80GB", "a800"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H800", "h800"),
        ("NVIDIA H200", "h200"),
    ],
)
def test_one_peak_table_names_every_datacenter_gpu(cuda_name, key):
    """The trainer's MFU and the planner read the same table (A800/H800 included)."""
    assert known_device(cuda_name) is DEVICES[key]
    assert known_device("NVIDIA GeForce RTX 4090") is None
