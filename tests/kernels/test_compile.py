"""torch.compile(fullgraph=True) over every Triton op (custom ops: opaque, no graph break)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.tolerance import assert_close_fp32


def block(x, w_qkv, norm_w, ln_w, ln_b, doc_ids, labels, impl):
    """A small model step touching each op: norms, both attentions, softmax, cross entropy."""
    b, t, c = x.shape
    h = kernels.rms_norm(x, norm_w, impl=impl)
    q, k, v = (h @ w_qkv).view(b, t, 3, 2, c // 2).permute(2, 0, 3, 1, 4)  # 3 x (B, 2, T, C/2)
    a = kernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids, impl=impl)
    u = kernels.unfused_attention(q, k[:, :1], v[:, :1], causal=True, impl=impl)  # GQA: one kv head
    o = (a + u).transpose(1, 2).reshape(b, t, c)
    o = kernels.layer_norm(o + x, ln_w, ln_b, impl=impl)
    p = kernels.scaled_masked_softmax(o, scale=0.5, causal=True, impl=impl)  # (B, T, C) as rows
    return kernels.cross_entropy(p * 4.0, labels, impl=impl).mean()


@pytest.mark.slow
def test_fullgraph_inductor_compile_matches_eager(interpreted_launches):
    torch._dynamo.reset()
    b, t, c = 2, 20, 32
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(b, t, c, generator=gen),
        torch.randn(c, 3 * c, generator=gen) / c**0.5,
        1 + 0.1 * torch.randn(c, generator=gen),
        1 + 0.1 * torch.randn(c, generator=gen),
        0.1 * torch.randn(c, generator=gen),
    ]
    doc_ids = torch.tensor([[0] * 12 + [1] * 8, [0] * 20])
    labels = torch.randint(0, c, (b, t), generator=gen)

    def run(fn):
        inputs = [p.clone().requires_grad_() for p in params]
        loss = fn(*inputs, doc_ids, labels, "triton")
        return loss.detach(), torch.autograd.grad(loss, inputs)

    eager_loss, eager_grads = run(block)
    interpreted_launches.clear()  # count the compiled run's launches only
    compiled_loss, compiled_grads = run(torch.compile(block, fullgraph=True, backend="inductor"))
    expected = {
        f"_{op}_kernel"
        for op in ("norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv",
                   "softmax_fwd", "softmax_bwd", "cross_entropy_fwd", "cross_entropy_bwd")
    }  # fmt: skip
    launched = set(interpreted_launches)
    assert expected <= launched, f"kernels missing from the compiled run: {expected - launched}"
    assert_close_fp32(compiled_loss, eager_loss, name="loss", tol=1e-5)
    for i, (g, eg) in enumerate(zip(compiled_grads, eager_grads, strict=True)):
        assert_close_fp32(g, eg, name=f"grad {i}", tol=1e-5)


@pytest.mark.slow
def test_ring_primitives_compile_without_graph_breaks(interpreter):
    """attention_forward / attention_backward (ring attention's building blocks) under fullgraph."""
    torch._dynamo.reset()
    q, k, v = torch.randn(1, 2, 18, 16), torch.randn(1, 1, 18, 16), torch.randn(1, 1, 18, 16)
    g = torch.randn_like(q)

    def fwd_bwd(q, k, v, g):
        out, lse = kernels.attention_forward(q, k, v, True, 0.3, impl="triton")
        return (out, lse, *kernels.attention_backward(g, q, k, v, out, lse, True, 0.3, impl="triton"))

    eager = fwd_bwd(q, k, v, g)
    compiled = torch.compile(fwd_bwd, fullgraph=True, backend="inductor")(q, k, v, g)
    for i, (a, e) in enumerate(zip(compiled, eager, strict=True)):
        assert_close_fp32(a, e, name=f"output {i}", tol=1e-6)


def test_auto_self_tests_at_trace_time_without_a_graph_break(interpreter, tmp_path, monkeypatch):
    """impl="auto" under fullgraph: the self-test runs once while tracing; its verdict is a constant."""
    from kernels import verify

    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path))
    torch._dynamo.reset()
    x, w = torch.randn(3, 40), 1 + torch.rand(40)

    def f(x, w):
        return kernels.rms_norm(x, w, impl="auto") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    assert len(list(tmp_path.glob("norms-float32-*.json"))) == 1
    torch.testing.assert_close(compiled, f(x, w))


@pytest.mark.slow
def test_compiled_model_on_triton_kernels_with_dropout_and_recompute_matches_eager(interpreted_launches):
    """``training.compile`` on ``model.kernels=triton``: megalm's llama blocks and loss compile as
    one graph each (``fullgraph``: a break raises) with the norm, flash attention and cross-entropy
    kernels inside as opaque custom ops; the kernels really run (spied). With dropout and
    activation checkpointing on, loss and gradients equal the eager model's: the masks come from
    PyTorch's generator (aten's ``bernoulli_`` on CPU; ``fallback_random`` on CUDA), and the
    recompute replays them.
    (LayerNorm and the softmax kernel under Inductor: the first test of this file.)"""
    from megalm.config import ModelConfig
    from megalm.model import GPT
    from megalm.model.compile import compile_blocks

    torch._dynamo.reset()
    cfg = ModelConfig(
        family="llama", vocab_size=70, n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, seq_len=16,
        vocab_multiple=8, kernels="triton", dropout=0.2,
    )  # fmt: skip
    eager, compiled = GPT(cfg, init_seed=5), GPT(cfg, init_seed=5)
    assert compile_blocks(compiled) == cfg.n_layers + 1  # every block and the loss
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def run(model):
        model.set_recompute(1)
        torch.manual_seed(7)  # the same dropout masks, if both draw them from torch's generator
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    eager_loss, eager_grads = run(eager)
    interpreted_launches.clear()  # count the compiled run's launches only
    compiled_loss, compiled_grads = run(compiled)
    expected = {
        f"_{op}_kernel"
        for op in ("norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv",
                   "cross_entropy_fwd", "cross_entropy_bwd")
    }  # fmt: skip
    launched = set(interpreted_launches)
    assert expected <= launched, f"kernels missing from the compiled run: {expected - launched}"
    assert_close_fp32(compiled_loss, eager_loss, name="loss", tol=1e-5)
    for name, grad in eager_grads.items():
        assert_close_fp32(compiled_grads[name], grad, name=name, tol=1e-5)
