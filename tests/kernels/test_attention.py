"""Flash attention (Triton, interpreted on CPU) against the plain-math reference."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import flash_attention
from kernels.attention import attention_reference, attention_sdpa
from kernels.attention.reference import attention_mask
from kernels.tolerance import assert_close_fp32, assert_within_torch_error


def make_inputs(b, hq, hkv, t, d, dtype, device, *, docs=False):
    q, k, v = (torch.randn(b, h, t, d, device=device).to(dtype).requires_grad_() for h in (hq, hkv, hkv))
    doc_ids = None
    if docs:  # 1-4 documents of random lengths per row, sorted as in packed sequences
        doc_ids = torch.sort(torch.randint(0, 4, (b, t), device=device), dim=1).values
    return q, k, v, doc_ids


def fwd_bwd(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def as_fp64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def attention_same_dtype(q, k, v, *, causal, softmax_scale=None, doc_ids=None):
    """PyTorch computing attention in the inputs' own dtype (the tolerance baseline)."""
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale or 1.0 / math.sqrt(q.shape[-1])
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, doc_ids=doc_ids, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


CASES_FP32 = [  # (t, d, hq, hkv, causal, docs)
    (1, 16, 2, 1, True, False),
    (17, 32, 2, 2, False, False),
    (17, 64, 4, 1, True, True),
    (129, 48, 2, 1, True, False),
    (129, 32, 4, 2, False, True),
    pytest.param(257, 32, 2, 1, True, True, marks=pytest.mark.slow),
    pytest.param(257, 128, 1, 1, False, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("t,d,hq,hkv,causal,docs", CASES_FP32)
def test_fp32_forward_and_grads_match_reference(device, t, d, hq, hkv, causal, docs):
    q, k, v, doc_ids = make_inputs(1, hq, hkv, t, d, torch.float32, device, docs=docs)
    grad_out = torch.randn_like(q)
    kw = dict(causal=causal, doc_ids=doc_ids)
    out, grads = fwd_bwd(flash_attention, q, k, v, grad_out, impl="triton", **kw)
    ref_out, ref_grads = fwd_bwd(attention_reference, *as_fp64(q, k, v), grad_out.double(), **kw)
    assert_close_fp32(out, ref_out, name="out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_close_fp32(g, rg, name=f"d{name}", tol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,d,hq,hkv,causal,docs", [(65, 32, 4, 2, True, True), (33, 64, 2, 1, False, False)])
def test_low_precision_within_twice_torch_error(device, dtype, t, d, hq, hkv, causal, docs):
    q, k, v, doc_ids = make_inputs(2, hq, hkv, t, d, dtype, device, docs=docs)
    grad_out = torch.randn_like(q)
    kw = dict(causal=causal, doc_ids=doc_ids)
    out, grads = fwd_bwd(flash_attention, q, k, v, grad_out, impl="triton", **kw)
    base_out, base_grads = fwd_bwd(attention_same_dtype, q, k, v, grad_out, **kw)
    ref_out, ref_grads = fwd_bwd(attention_reference, *as_fp64(q, k, v), grad_out.double(), **kw)
    assert out.dtype == dtype
    assert_within_torch_error(out, base_out, ref_out, name="out")
    for name, g, bg, rg in zip("qkv", grads, base_grads, ref_grads, strict=True):
        assert_within_torch_error(g, bg, rg, name=f"d{name}")


def test_custom_scale_and_strided_inputs(device):
    # (B, T, H, D) memory viewed as (B, H, T, D): the layout a fused QKV projection gives.
    b, t, hq, hkv, d = 2, 40, 4, 2, 32
    q = torch.randn(b, t, hq, d, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hkv, d, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(b, t, hkv, d, device=device).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    grad_out = torch.randn(b, hq, t, d, device=device)
    kw = dict(causal=True, softmax_scale=0.3)
    out, grads = fwd_bwd(flash_attention, q, k, v, grad_out, impl="triton", **kw)
    ref_out, ref_grads = fwd_bwd(attention_reference, *as_fp64(q, k, v), grad_out.double(), **kw)
    assert_close_fp32(out, ref_out, name="out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_close_fp32(g, rg, name=f"d{name}", tol=5e-5)


def test_other_tile_shapes_give_same_result(device):
    from kernels.attention.function import AttentionConfig, attention_bwd_launch, attention_fwd_launch

    q, k, v, doc_ids = make_inputs(1, 2, 1, 50, 32, torch.float32, device, docs=True)
    q, k, v = q.detach(), k.detach(), v.detach()
    grad_out = torch.randn_like(q)
    ref_out, ref_grads = fwd_bwd(
        attention_reference, *as_fp64(q, k, v), grad_out.double(), causal=True, doc_ids=doc_ids
    )
    configs = (AttentionConfig(16, 16, 16, 16, 16, 16, 1, 1), AttentionConfig(64, 32, 16, 64, 64, 32, 1, 1))
    for config in configs:
        scale = 1 / math.sqrt(32)
        out, lse = attention_fwd_launch(q, k, v, doc_ids, None, True, scale, config)
        grads = attention_bwd_launch(grad_out, q, k, v, out, lse, doc_ids, None, True, scale, None, config)
        assert_close_fp32(out, ref_out, name=f"out {config}")
        for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
            assert_close_fp32(g, rg, name=f"d{name} {config}", tol=5e-5)


def test_running_twice_is_bitwise_identical(device):
    q, k, v, doc_ids = make_inputs(1, 4, 2, 45, 32, torch.bfloat16, device, docs=True)
    grad_out = torch.randn_like(q)
    first = fwd_bwd(flash_attention, q, k, v, grad_out, doc_ids=doc_ids, impl="triton")
    second = fwd_bwd(flash_attention, q, k, v, grad_out, doc_ids=doc_ids, impl="triton")
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


def test_nan_in_a_query_row_propagates_like_reference(device):
    q, k, v, _ = make_inputs(1, 2, 1, 20, 16, torch.float32, device)
    q = q.detach().clone()
    q[0, 1, 7, 3] = float("nan")
    out = flash_attention(q, k, v, causal=True, impl="triton")
    ref = attention_reference(q, k, v, causal=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().sum() == q.shape[-1]  # exactly the poisoned row
    assert_close_fp32(out, ref)


def test_unsupported_head_dim_falls_back_to_sdpa(device):
    q, k, v, _ = make_inputs(1, 2, 2, 9, 20, torch.float32, device)  # D=20: not a multiple of 16
    out = flash_attention(q, k, v, causal=True, impl="triton")
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", [True, False])
def test_torch_path_matches_reference(causal, docs):
    q, k, v, doc_ids = make_inputs(2, 4, 2, 23, 16, torch.float32, "cpu", docs=docs)
    out = flash_attention(q, k, v, causal=causal, doc_ids=doc_ids, impl="torch")
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=causal, doc_ids=doc_ids))
    auto = flash_attention(q, k, v, causal=causal, doc_ids=doc_ids)  # CPU tensors: auto = torch
    torch.testing.assert_close(auto, attention_sdpa(q, k, v, causal=causal, doc_ids=doc_ids))


def test_shape_errors_name_the_shapes():
    q = torch.randn(1, 3, 8, 16)
    kv = torch.randn(1, 2, 8, 16)  # 2 kv heads do not divide 3 q heads
    with pytest.raises(ValueError, match="kv heads"):
        attention_reference(q, kv, kv)
    q, kv = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        flash_attention(q, kv, kv, causal=True)
    with pytest.raises(ValueError, match=r"doc_ids must be \(B, Tq\)"):
        flash_attention(q, q, q, doc_ids=torch.zeros(1, 9, dtype=torch.long))
