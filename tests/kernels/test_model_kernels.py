"""A tiny model trained on the Triton kernels (interpreted on CPU) matches ``model.kernels=torch``."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from kernels import dispatch, verify
from kernels.interpreter import kernel_module
from megalm.config import ModelConfig
from megalm.model import GPT


def train_losses(cfg: ModelConfig, device: str, steps: int = 5) -> list[float]:
    """The losses of ``steps`` AdamW steps on one fixed batch (2, seq_len + 1); same weights every call."""
    model = GPT(cfg, init_seed=0).to(device)
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


def _spy_dispatch(monkeypatch) -> list[tuple[str, str, bool]]:
    """Record (op, impl, Triton?) for every dispatch decision of the model's ops, whoever asks
    (the kernels' public functions, or the model's layers choosing their PyTorch path)."""
    taken = []
    original = dispatch._decide

    def spy(impl, devices, dtype, op, _original=original):
        decision = _original(impl, devices, dtype, op)
        taken.append((op, impl, decision))
        return decision

    monkeypatch.setattr(dispatch, "_decide", spy)
    return taken


def _config(family: str) -> ModelConfig:
    return ModelConfig(
        family=family, vocab_size=300, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seq_len=33,
        kernels="torch",
    )  # fmt: skip


def assert_close_losses(got: list[float], ref: list[float]) -> None:
    """``ref`` trains (its loss falls by 0.1) and ``got`` follows it within 1e-4 relative, step by step."""
    assert ref[-1] < ref[0] - 0.1  # it trains
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref, strict=True))
    assert worst <= 1e-4, f"losses {got} vs {ref}: relative difference {worst:.1e}"


@pytest.mark.slow
def test_five_steps_with_triton_kernels_match_torch(device, monkeypatch):
    """gpt2: attention (head dim 16), LayerNorm and cross entropy all take the Triton path."""
    taken = _spy_dispatch(monkeypatch)
    cfg = _config("gpt2")
    ref = train_losses(cfg, device)
    assert all(not decision for _, _, decision in taken)
    got = train_losses(dataclasses.replace(cfg, kernels="triton"), device)
    assert {op for op, impl, decision in taken if impl == "triton" and decision} == {
        "attention",
        "norms",
        "cross_entropy",
    }
    assert_close_losses(got, ref)


@pytest.mark.slow
def test_auto_with_a_wrong_kernel_trains_on_the_pytorch_path_with_one_warning(
    device, monkeypatch, caplog, tmp_path
):
    """llama, kernels=auto, a broken RMSNorm kernel injected: caught by its self-test, one
    warning, RMSNorm on PyTorch while attention and cross entropy pass and run on Triton."""
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path))
    broken = kernel_module("broken_kernels")
    monkeypatch.setattr(kernel_module("kernels.norms.kernel"), "_norm_fwd_kernel", broken._norm_fwd_kernel)
    taken = _spy_dispatch(monkeypatch)
    cfg = _config("llama")
    ref = train_losses(cfg, device, steps=3)
    with caplog.at_level(logging.WARNING, logger="kernels.verify"):
        got = train_losses(dataclasses.replace(cfg, kernels="auto"), device, steps=3)
    warnings = [r.getMessage() for r in caplog.records if r.name == "kernels.verify"]
    assert len(warnings) == 1 and "kernel norms failed its self-test" in warnings[0], warnings
    decided = {(op, decision) for op, impl, decision in taken if impl == "auto"}
    assert decided == {("attention", True), ("cross_entropy", True), ("norms", False)}
    assert_close_losses(got, ref)
