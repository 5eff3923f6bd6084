"""Model properties: parameter count, FLOPs, causality, init, tying, GQA."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model import GPT
from megalm.perf.flops import model_flops_per_token, param_count


def small(family: str, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=97, n_layers=3, d_model=48, n_heads=6, seq_len=19)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("n_kv_heads", [0, 3, 1])
def test_param_count_matches_module(family, n_kv_heads):
    cfg = small(family, n_kv_heads=n_kv_heads)
    assert param_count(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


def test_param_count_gpt2_small_is_124m():
    # GPT-2 small: 124,439,808 parameters with the 50257-token vocabulary (Radford et al. 2019).
    cfg = ModelConfig(
        family="gpt2", vocab_size=50257, n_layers=12, d_model=768, n_heads=12, seq_len=1024, vocab_multiple=1
    )
    assert param_count(cfg) == 124_439_808
    # Megatron-style padding to a multiple of 128 adds 47 rows of 768.
    assert param_count(dataclasses.replace(cfg, vocab_multiple=128)) == 124_439_808 + 47 * 768


def test_flops_per_token_formula_by_hand():
    cfg = ModelConfig(family="gpt2", vocab_size=1000, n_layers=2, d_model=64, n_heads=4, seq_len=32)
    n_mm = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 1024 * 64  # vocabulary padded to 8 * 128
    assert model_flops_per_token(cfg) == 6 * n_mm + 12 * 2 * 32 * 64
    assert model_flops_per_token(cfg, causal=True) == 6 * n_mm + 6 * 2 * 32 * 64


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_future_tokens_do_not_change_past_logits(family):
    torch.manual_seed(0)
    model = GPT(small(family, n_kv_heads=2)).eval()
    x = torch.randint(0, 97, (2, 19))
    y = x.clone()
    y[:, 11:] = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model(x)[:, :11], model(y)[:, :11], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x)[:, 11:], model(y)[:, 11:])


def test_initial_loss_is_near_uniform_and_residual_init_is_scaled():
    torch.manual_seed(0)
    cfg = small("llama", n_layers=8, vocab_size=4096, d_model=128, n_heads=4)
    model = GPT(cfg)
    x = torch.randint(0, 4096, (4, 19))
    assert abs(model(x, x).item() - math.log(4096)) < 0.1
    expected = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.wo.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert block.mlp.w2.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert block.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_families_tie_embeddings_as_documented():
    gpt2 = GPT(small("gpt2"))
    assert gpt2.head is None  # logits come from embed.tok_emb.weight
    llama = GPT(small("llama"))
    assert llama.head.proj.weight.shape == llama.embed.tok_emb.weight.shape
    assert not torch.equal(llama.head.proj.weight, llama.embed.tok_emb.weight)
    assert GPT(small("llama", tie_embeddings=True)).head is None
    assert param_count(small("llama")) - param_count(small("llama", tie_embeddings=True)) == 128 * 48


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = GPT(small("llama", n_kv_heads=2)).eval()
    mha = GPT(small("llama", n_kv_heads=0)).eval()
    sd = gqa.state_dict()
    hs = 48 // 6
    for i in range(3):
        for name in ("wk", "wv"):
            w = sd[f"blocks.{i}.attn.{name}.weight"].view(2, hs, 48)
            sd[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(3, dim=0).reshape(48, 48)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 19))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected_with_the_keys_named():
    with pytest.raises(ValueError, match=r"model.d_model \(50\) must be divisible by model.n_heads \(6\)"):
        GPT(small("llama", d_model=50))
    with pytest.raises(ValueError, match=r"model.n_heads \(6\) must be divisible by model.n_kv_heads \(4\)"):
        GPT(small("llama", n_kv_heads=4))
