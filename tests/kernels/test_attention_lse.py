"""attention_forward / attention_backward: logsumexp out, global (out, lse) in (ring attention prep)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import attention_backward, attention_forward
from kernels.attention import attention_reference
from kernels.attention.ops import attention_fwd
from kernels.attention.reference import attention_mask
from kernels.tolerance import assert_close_fp32

IMPLS = ["triton", "torch"]


def inputs(device, b, hq, hkv, tq, tk, d, *, docs):
    q = torch.randn(b, hq, tq, d, device=device)
    k, v = (torch.randn(b, hkv, tk, d, device=device) for _ in range(2))
    doc_q = doc_k = None
    if docs:  # sorted ids (packed documents); keys may start in a later document
        doc_q = torch.sort(torch.randint(0, 3, (b, tq), device=device), dim=1).values
        doc_k = torch.sort(torch.randint(0, 3, (b, tk), device=device), dim=1).values if tk != tq else None
    return q, k, v, doc_q, doc_k


def reference_with_grads(q, k, v, grad_out, **kw):
    """fp64 autograd of the plain reference: out, lse (independently), dq, dk, dv."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q64, k64, v64, **kw)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    group = q.shape[1] // k.shape[1]
    scores = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) * kw["softmax_scale"]
    mask = attention_mask(
        q.shape[2], k.shape[2], causal=kw["causal"], doc_ids=kw["doc_ids"], kv_doc_ids=kw["kv_doc_ids"],
        device=q.device,
    )  # fmt: skip
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return out.detach(), torch.logsumexp(scores, -1).detach(), *grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "b,hq,hkv,tq,tk,d,causal,docs",
    [
        (1, 4, 2, 37, 37, 32, True, True),
        (2, 2, 1, 23, 41, 16, False, True),
        (1, 3, 3, 1, 19, 64, False, False),
    ],
)
def test_forward_lse_and_backward_match_autograd_of_reference(
    device, impl, b, hq, hkv, tq, tk, d, causal, docs
):
    if impl == "torch" and device != "cpu":
        device = "cpu"
    q, k, v, doc_q, doc_k = inputs(device, b, hq, hkv, tq, tk, d, docs=docs)
    grad_out = torch.randn_like(q)
    kw = dict(causal=causal, softmax_scale=0.7 / math.sqrt(d), doc_ids=doc_q, kv_doc_ids=doc_k)
    ref_out, ref_lse, *ref_grads = reference_with_grads(q, k, v, grad_out, **kw)
    fkw = dict(doc_ids=doc_q, kv_doc_ids=doc_k, impl=impl)
    out, lse = attention_forward(q, k, v, causal, kw["softmax_scale"], **fkw)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, tq)
    assert_close_fp32(out, ref_out, name="out")
    assert_close_fp32(lse, ref_lse, name="lse")  # -inf where a query sees no key
    grads = attention_backward(grad_out, q, k, v, out, lse, causal, kw["softmax_scale"], **fkw)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert g.shape == rg.shape and g.dtype == q.dtype
        assert_close_fp32(g, rg, name=f"d{name}", tol=5e-5)


def combine(parts):
    """Merge partial attentions over disjoint key sets through their logsumexp."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    out = sum(p[0] * torch.exp(p[1] - lse)[..., None] for p in parts)
    return out, lse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("docs", [False, True])
def test_two_chunk_ring_with_global_out_and_lse_matches_full_causal_attention(device, impl, docs):
    """Load-balanced causal split (chunks A, B): A sees A (causal); B sees A (full) and B (causal).

    Partial outputs combine through the logsumexp; each block's backward takes the
    *global* (out, lse) of its query chunk, dq sums over blocks, dk/dv over queries.
    """
    if impl == "torch" and device != "cpu":
        device = "cpu"
    h, d, scale = 21, 32, 0.2
    q, k, v, doc_ids, _ = inputs(device, 2, 4, 2, 2 * h, 2 * h, d, docs=docs)
    grad_out = torch.randn_like(q)
    kw = dict(causal=True, softmax_scale=scale, doc_ids=doc_ids, kv_doc_ids=None)
    ref_out, ref_lse, *ref_grads = reference_with_grads(q, k, v, grad_out, **kw)
    a, b_ = slice(0, h), slice(h, 2 * h)
    doc = (lambda s: None) if doc_ids is None else (lambda s: doc_ids[:, s])
    blocks = [(a, a, True), (b_, a, False), (b_, b_, True)]  # (query chunk, key chunk, causal)

    def fwd(qs, ks, causal):
        return attention_forward(
            q[:, :, qs],
            k[:, :, ks],
            v[:, :, ks],
            causal,
            scale,
            doc_ids=doc(qs),
            kv_doc_ids=doc(ks),
            impl=impl,
        )

    partial = {(qs.start, ks.start): fwd(qs, ks, causal) for qs, ks, causal in blocks}
    out_a, lse_a = partial[(0, 0)]
    out_b, lse_b = combine([partial[(h, 0)], partial[(h, h)]])
    out, lse = torch.cat([out_a, out_b], 2), torch.cat([lse_a, lse_b], 2)
    assert_close_fp32(out, ref_out, name="out")
    assert_close_fp32(lse, ref_lse, name="lse")
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks, causal in blocks:
        gq, gk, gv = attention_backward(
            grad_out[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs], lse[:, :, qs],
            causal, scale, doc_ids=doc(qs), kv_doc_ids=doc(ks), impl=impl,
        )  # fmt: skip
        dq[:, :, qs] += gq
        dk[:, :, ks] += gk
        dv[:, :, ks] += gv
    for name, g, rg in zip("qkv", (dq, dk, dv), ref_grads, strict=True):
        assert_close_fp32(g, rg, name=f"d{name}", tol=5e-5)


def test_lse_output_of_the_op_is_differentiable(device):
    """A loss that uses the op's logsumexp output gets its gradient (dlse/dS = P)."""
    q, k, v, doc_ids, _ = inputs(device, 1, 2, 1, 30, 30, 16, docs=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g_out, g_lse = torch.randn_like(q), torch.randn(1, 2, 30, device=device)
    out, lse = attention_fwd(q, k, v, doc_ids, None, True, 0.25)
    grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    mask = attention_mask(30, 30, causal=True, doc_ids=doc_ids, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    ref_out = torch.softmax(scores, -1) @ v64.repeat_interleave(2, 1)
    ref_lse = torch.logsumexp(scores, -1)
    loss = (ref_out * g_out.double()).sum() + (ref_lse * g_lse.double()).sum()
    ref_grads = torch.autograd.grad(loss, (q64, k64, v64))
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert_close_fp32(g, rg, name=f"d{name}", tol=5e-5)


def test_bad_shapes_are_named():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="lse"):
        attention_backward(q, q, q, q, q, torch.zeros(1, 2, 4), False, impl="torch")
    with pytest.raises(ValueError, match="kv_doc_ids"):
        attention_forward(q, q, q, False, kv_doc_ids=torch.zeros(1, 5), impl="torch")
