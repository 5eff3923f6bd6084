"""Initialization statistics per component: N(0, init_std), residual projections scaled by
``1/sqrt(2 n_layers)`` (GPT-2, Radford et al. 2019, section 2.3), biases zero, norm gains one.

Sample statistics of a 256 x 256 matrix: the standard deviation's relative standard error
is ``1/sqrt(2N)`` = 0.3%, the fraction inside one std has standard error 0.2%; the
tolerances below are about six of those, and far below what a wrong scale (e.g.
``1/sqrt(L)``: 41% off) or a uniform draw (57.7% inside one std instead of 68.3%) moves.
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model import GPT

L = 4
RESIDUAL = 1 / math.sqrt(2 * L)
# Weight std per component, in units of model.init_std.
STD = {
    "embed.tok_emb.weight": 1.0,
    "embed.pos_emb.weight": 1.0,  # gpt2's learned positions
    "blocks.*.attn.wq.weight": 1.0,
    "blocks.*.attn.wk.weight": 1.0,
    "blocks.*.attn.wv.weight": 1.0,
    "blocks.*.attn.wo.weight": RESIDUAL,  # output projection into the residual stream
    "blocks.*.mlp.w1.weight": 1.0,
    "blocks.*.mlp.w3.weight": 1.0,  # llama's SwiGLU gate
    "blocks.*.mlp.w2.weight": RESIDUAL,  # output projection into the residual stream
    "head.proj.weight": 1.0,  # llama's untied head
}
INSIDE_ONE_STD = math.erf(1 / math.sqrt(2))  # 0.6827 for a normal distribution


def _model(family: str, init_std: float = 0.02, seed: int = 0) -> GPT:
    cfg = ModelConfig(
        family=family,
        vocab_size=1000,
        n_layers=L,
        d_model=256,
        n_heads=4,
        n_kv_heads=4,
        ffn_hidden=256,
        seq_len=256,
        init_std=init_std,
    )
    return GPT(cfg, init_seed=seed)


def _expected_std(name: str) -> float:
    matches = [v for pattern, v in STD.items() if fnmatch.fnmatch(name, pattern)]
    assert len(matches) == 1, f"{name}: add it to STD with its intended std"
    return matches[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("init_std", [0.02, 0.006])
def test_every_weight_matrix_is_normal_with_its_component_std(family, init_std):
    model = _model(family, init_std)
    seen = set()
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        w = p.detach().double().flatten()
        std = init_std * _expected_std(name)
        seen.add(name.split(".")[-2])
        assert abs(w.std().item() / std - 1) < 0.02, f"{name}: std {w.std().item():.5f}, expected {std:.5f}"
        assert abs(w.mean().item()) < 6 * std / math.sqrt(w.numel()), f"{name}: mean {w.mean().item():.2e}"
        inside = (w.abs() < std).double().mean().item()
        assert abs(inside - INSIDE_ONE_STD) < 0.012, f"{name}: {inside:.4f} inside one std (normal: 0.6827)"
    expected = {"tok_emb", "wq", "wk", "wv", "wo", "w1", "w2"}
    expected |= {"w3", "proj"} if family == "llama" else {"pos_emb"}
    assert seen == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_biases_start_at_zero_and_norm_gains_at_one(family):
    model = _model(family)
    vectors = {n: p.detach() for n, p in model.named_parameters() if p.dim() == 1}
    gains = {n: v for n, v in vectors.items() if "norm" in n and n.endswith("weight")}
    biases = {n: v for n, v in vectors.items() if n not in gains}
    assert len(gains) == 2 * L + 1  # two per block and the final norm
    assert all(torch.equal(v, torch.ones_like(v)) for v in gains.values())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in biases.values())
    assert bool(biases) == (family == "gpt2")  # llama has no biases at all


def test_components_have_their_own_draws_and_the_seed_decides_them():
    a, b, c = _model("llama", seed=0), _model("llama", seed=0), _model("llama", seed=1)
    for (name, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    wq = [blk.attn.wq.weight for blk in a.blocks]
    assert all(not torch.equal(wq[0], w) for w in wq[1:])  # every block is its own draw
