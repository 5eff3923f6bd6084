"""A tiny model trained with ``model.kernels=triton`` (interpreted on CPU) matches ``torch``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model import GPT


def _train(cfg: ModelConfig, device: str, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=gen).to(device)
    losses = []
    for _ in range(steps):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_five_steps_with_triton_kernels_match_torch(device, family, monkeypatch):
    """Attention (head dim 16), RMSNorm/LayerNorm and cross entropy all take the Triton path."""
    import kernels.attention
    import kernels.norms

    taken = []
    for module in (kernels.attention, kernels.norms):
        original = module.use_triton

        def spy(impl, *tensors, _original=original, _name=module.__name__):
            decision = _original(impl, *tensors)
            taken.append((_name, impl, decision))
            return decision

        monkeypatch.setattr(module, "use_triton", spy)
    cfg = ModelConfig(
        family=family,
        vocab_size=300,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        seq_len=33,
        kernels="torch",
    )
    ref = _train(cfg, device)
    assert all(not decision for _, _, decision in taken)
    got = _train(dataclasses.replace(cfg, kernels="triton"), device)
    assert {name for name, impl, decision in taken if impl == "triton" and decision} == {
        "kernels.attention",
        "kernels.norms",
    }
    assert ref[-1] < ref[0] - 0.1  # it trains
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
    assert worst <= 1e-4, f"losses {got} vs {ref}: relative difference {worst:.1e}"
