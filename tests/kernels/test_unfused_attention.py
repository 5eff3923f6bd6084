"""Unfused attention (Q K^T -> fused scale-mask-softmax kernel -> P V) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels import unfused_attention
from kernels.attention import attention_reference
from kernels.tolerance import assert_close_fp32


def fwd_bwd(fn, q, k, v, grad_out, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), grad_out)


def fp64(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize(
    "b,hq,hkv,t,d,causal,docs", [(1, 4, 2, 37, 16, True, True), (1, 2, 1, 70, 32, False, False)]
)
def test_matches_reference_forward_and_grads(device, impl, b, hq, hkv, t, d, causal, docs):
    dev = device if impl == "triton" else "cpu"
    q, k, v = (torch.randn(b, h, t, d, device=dev) for h in (hq, hkv, hkv))
    doc_ids = torch.sort(torch.randint(0, 3, (b, t), device=dev), 1).values if docs else None
    grad_out = torch.randn_like(q)
    kw = dict(causal=causal, softmax_scale=0.3, doc_ids=doc_ids)
    out, grads = fwd_bwd(unfused_attention, q, k, v, grad_out, impl=impl, **kw)
    ref, ref_grads = fwd_bwd(attention_reference, *fp64(q, k, v), grad_out.double(), **kw)
    assert_close_fp32(out, ref, name="out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_close_fp32(g, rg, name=f"d{name}", tol=5e-5)


@pytest.mark.parametrize("tq", [1, 3])
def test_kv_cache_rows_equal_the_last_rows_of_full_causal_attention(device, tq):
    """Decode: the newest Tq queries against a cache of Tk keys (query i at position Tk - Tq + i)."""
    b, hq, hkv, tk, d = 2, 4, 2, 29, 16
    q_all = torch.randn(b, hq, tk, d, device=device)
    k, v = (torch.randn(b, hkv, tk, d, device=device) for _ in range(2))
    q = q_all[:, :, -tq:]
    grad_out = torch.randn_like(q)
    out, (dq, dk, dv) = fwd_bwd(unfused_attention, q, k, v, grad_out, causal=True, impl="triton")
    full_grad = torch.zeros(b, hq, tk, d, device=device, dtype=torch.float64)
    full_grad[:, :, -tq:] = grad_out.double()
    ref, (rdq, rdk, rdv) = fwd_bwd(attention_reference, *fp64(q_all, k, v), full_grad, causal=True)
    assert_close_fp32(out, ref[:, :, -tq:], name="out")
    assert_close_fp32(dq, rdq[:, :, -tq:], name="dq", tol=5e-5)
    assert_close_fp32(dk, rdk, name="dk", tol=5e-5)
    assert_close_fp32(dv, rdv, name="dv", tol=5e-5)


def test_arbitrary_mask_and_empty_rows(device):
    b, h, tq, tk, d = 1, 2, 6, 45, 16
    q, k, v = (
        torch.randn(b, h, tq, d, device=device),
        *(torch.randn(b, h, tk, d, device=device) for _ in range(2)),
    )
    mask = torch.rand(b, 1, tq, tk, device=device) < 0.5  # True = masked
    mask[:, :, 2] = True  # a query that sees nothing
    out = unfused_attention(q, k, v, causal=False, mask=mask, impl="triton")
    probs = torch.softmax(
        (q.double() @ k.double().transpose(-1, -2) * d**-0.5).masked_fill(mask, -torch.inf), -1
    )
    ref = torch.nan_to_num(probs) @ v.double()
    assert_close_fp32(out, ref, name="out")
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
