"""The model's attention paths on the Triton kernels (compiled on CUDA, interpreted on CPU):
``model.attention=unfused`` (fused scale-mask-softmax kernel) trains like ``flash``, document
masking on the kernels equals running each document alone, and KV-cache decoding runs its
one-row steps through the softmax kernel and gives the no-cache loop's tokens."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from megalm.config import ModelConfig
from megalm.model import GPT, Sampling, decoding, generate
from tests.kernels.test_model_kernels import assert_close_losses, train_losses
from tests.test_document_mask import packed_window, per_document_errors


def _config(family: str, **kw) -> ModelConfig:
    """Small enough for the interpreter: head size 16 (the flash kernel's minimum), 2 heads, GQA."""
    base = dict(family=family, vocab_size=500, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, seq_len=36)
    base.update(kw)
    return ModelConfig(**base)


def _only_attention_on_triton(monkeypatch) -> None:
    """Norms and cross entropy on their PyTorch paths (their kernels have tests of their own), so
    two runs differ only in the attention path and the interpreter spends its time there."""
    for name in ("kernels.norms", "kernels.cross_entropy"):
        monkeypatch.setattr(importlib.import_module(name), "use_triton", lambda *args, **kwargs: False)


def _spy(monkeypatch, name: str) -> list[tuple[str, bool, tuple]]:
    """Record (impl, Triton?, first tensor's shape) of every dispatch decision of module ``name``."""
    module = importlib.import_module(name)
    original, taken = module.use_triton, []

    def spy(impl, *tensors, **kwargs):
        decision = original(impl, *tensors, **kwargs)
        taken.append((impl, decision, tuple(tensors[0].shape)))
        return decision

    monkeypatch.setattr(module, "use_triton", spy)
    return taken


@pytest.mark.slow
def test_unfused_attention_trains_five_steps_like_flash(device, monkeypatch):
    """Q K^T -> Triton scale-mask-softmax (forward and backward) -> P V trains the losses of
    model.attention=flash (on SDPA, the definition of correct) within 1e-4."""
    _only_attention_on_triton(monkeypatch)
    softmax = _spy(monkeypatch, "kernels.softmax")
    cfg = _config("llama", n_layers=2, seq_len=16)
    flash = train_losses(cfg, device)
    unfused = train_losses(dataclasses.replace(cfg, attention="unfused", kernels="triton"), device)
    assert softmax and all(impl == "triton" and decision for impl, decision, _ in softmax)
    assert_close_losses(unfused, flash)


@pytest.mark.slow
def test_document_mask_on_the_flash_kernel_equals_each_document_alone(device, monkeypatch):
    """doc_ids reach the Triton flash kernel (forward and backward): logits, loss and gradients.
    (The unfused path's mask is the softmax kernel's ``mask`` argument, tested in test_softmax.py.)"""
    _only_attention_on_triton(monkeypatch)
    taken = _spy(monkeypatch, "kernels.attention")
    model = GPT(_config("llama", kernels="triton"), init_seed=1).to(device)
    x, y, pos, doc = (t.to(device) for t in packed_window(batch=1))
    errors = per_document_errors(model, x, y, pos, doc)
    assert taken and all(decision for _, decision, _ in taken)
    worst = max(errors, key=errors.get)
    tolerance = 1e-5 if device == "cpu" else 2e-3  # compiled fp32 dots run in TF32 on CUDA
    assert errors[worst] <= tolerance, f"{worst}: {errors[worst]:.2e}"


@pytest.mark.slow
def test_kv_cache_decode_runs_the_softmax_kernel_one_row_at_a_time(device, monkeypatch):
    _only_attention_on_triton(monkeypatch)
    softmax = _spy(monkeypatch, "kernels.softmax")
    model = GPT(_config("gpt2", n_layers=2, kernels="triton"), init_seed=2).to(device)
    prompts = [[5, 9, 2, 44, 17], [81, 3]]
    with decoding(model):
        cached = generate(model, prompts, 6, 36, Sampling(0), use_cache=True, device=device)
        steps = list(softmax)
        loop = generate(model, prompts, 6, 36, Sampling(0), use_cache=False, device=device)
    assert cached == loop
    # 5 decode steps x 2 layers, each (B, heads, 1 query row, keys so far) on the Triton kernel
    assert [(shape[2], shape[3]) for _, _, shape in steps] == [
        (1, 5 + s) for s in range(1, 6) for _ in range(2)
    ]
    assert all(decision for _, decision, _ in steps)
