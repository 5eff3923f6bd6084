"""Rotary position embedding against its closed form (Su et al. 2021, RoFormer eq. 34).

For position ``m`` and the channel pair ``(i, i + hs/2)`` (rotate-half layout) with
``theta_i = base^(-2i/hs)``::

    x'_i        = x_i cos(m theta_i) - x_{i+hs/2} sin(m theta_i)
    x'_{i+hs/2} = x_{i+hs/2} cos(m theta_i) + x_i sin(m theta_i)

The expected values are computed per element with Python's ``math`` in double precision,
independently of the implementation's tensor code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megalm.config import ModelConfig
from megalm.model.layers import Attention, Rotary

HS, BASE = 16, 10000.0
POSITIONS = [0, 1, 2, 100, 1023, 2047, 2048, 2049, 3001, 4095]  # past 2k: where fp32 angles go wrong


def closed_form_angle(m: int, i: int, hs: int = HS, base: float = BASE) -> float:
    """``m * theta_i`` in double precision."""
    return m * math.pow(base, -2.0 * i / hs)


def test_tables_equal_the_double_precision_closed_form_rounded_once():
    rope = Rotary(HS, 4096, BASE)
    assert rope.cos.dtype == rope.sin.dtype == torch.float32 and rope.cos.shape == (4096, HS)
    worst = 0.0
    for m in POSITIONS:
        for i in range(HS // 2):
            a = closed_form_angle(m, i)
            for col in (i, i + HS // 2):  # both halves of the pair use the same angle
                worst = max(worst, abs(rope.cos[m, col].item() - math.cos(a)))
                worst = max(worst, abs(rope.sin[m, col].item() - math.sin(a)))
    # Angles in fp64, rounded to fp32 once: at most half an ulp of 1 (2^-24) from the truth.
    assert worst <= 2**-24, worst


def test_fp32_angles_would_fail_the_same_bound_past_2k():
    """Why the angles are computed in fp64: in fp32, m * theta at m ~ 4k loses ~1e-4 rad,
    so the bound above is a real check of the fp64 computation."""
    inv_freq = 1.0 / (BASE ** (torch.arange(0, HS, 2, dtype=torch.float32) / HS))
    angles32 = torch.outer(torch.arange(4096, dtype=torch.float32), inv_freq)
    errors = [
        abs(angles32[m, i].cos().item() - math.cos(closed_form_angle(m, i)))
        for m in POSITIONS
        if m > 2048
        for i in range(HS // 2)
    ]
    assert max(errors) > 100 * 2**-24


def test_forward_rotates_each_channel_pair_by_position_times_frequency():
    T = 4096
    x = torch.randn(2, 3, T, HS, generator=torch.Generator().manual_seed(0))
    y, _ = Rotary(HS, T, BASE)(x, x)
    xd = x.double().numpy()
    for m in POSITIONS:
        for i in range(HS // 2):
            c, s = math.cos(closed_form_angle(m, i)), math.sin(closed_form_angle(m, i))
            lo, hi = xd[..., m, i], xd[..., m, i + HS // 2]
            np.testing.assert_allclose(y[..., m, i].double().numpy(), lo * c - hi * s, atol=2e-6)
            np.testing.assert_allclose(y[..., m, i + HS // 2].double().numpy(), hi * c + lo * s, atol=2e-6)


def test_scores_depend_only_on_the_relative_position_far_past_2k():
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k>: the property RoPE exists for."""
    T = 4096
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(HS, generator=gen), torch.randn(HS, generator=gen)
    rope = Rotary(HS, T, BASE)
    rq = rope(q.expand(1, 1, T, HS), q.expand(1, 1, T, HS))[0][0, 0].double()  # (T, hs): q at every position
    rk = rope(k.expand(1, 1, T, HS), k.expand(1, 1, T, HS))[1][0, 0].double()
    for m, n in [(5, 2), (40, 40), (700, 3)]:
        near = (rq[m] @ rk[n]).item()
        for shift in (1000, 2500, 4095 - max(m, n)):
            far = (rq[m + shift] @ rk[n + shift]).item()
            assert far == pytest.approx(near, rel=1e-5, abs=1e-5), (m, n, shift)
    assert torch.allclose(rq.norm(dim=-1), q.double().norm().expand(T), rtol=1e-6)  # a rotation


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_llama_attention_uses_the_configured_base_and_gpt2_has_no_rotary(theta):
    cfg = ModelConfig(family="llama", vocab_size=64, d_model=64, n_heads=4, seq_len=2100, rope_theta=theta)
    attn = Attention(cfg)
    hs = cfg.head_size
    for m in (1, 2099):
        for i in range(hs // 2):
            expected = math.cos(closed_form_angle(m, i, hs, theta))
            assert abs(attn.rotary.cos[m, i].item() - expected) <= 2**-24
    gpt2 = ModelConfig(family="gpt2", vocab_size=64, d_model=64, n_heads=4, seq_len=64)
    assert Attention(gpt2).rotary is None
