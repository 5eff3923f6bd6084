"""Compiled Triton kernels on a real GPU at moderate sizes (skipped without CUDA).

``pytest -m gpu tests/kernels`` (launch/gpu_check.sh does). On a CUDA machine
every other test in tests/kernels also runs the compiled kernels on the GPU (the
``device`` fixture is ``"cuda"`` unless the session starts with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cross_entropy, flash_attention, layer_norm, rms_norm, scaled_masked_softmax, verify
from kernels.attention import attention_reference
from kernels.softmax import scaled_masked_softmax_reference
from kernels.tolerance import assert_within_torch_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _fp64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal,docs", [(True, False), (False, False), (True, True)])
def test_flash_attention_bf16_matches_sdpa_error_budget(head_dim, causal, docs):
    b, hq, hkv, t = 2, 8, 2, 1024 + 17
    q = torch.randn(b, hq, t, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, t, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, t, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    doc_ids = torch.sort(torch.randint(0, 5, (b, t), device="cuda"), dim=1).values if docs else None
    grad_out = torch.randn_like(q)
    kw = dict(causal=causal, doc_ids=doc_ids)
    out = flash_attention(q, k, v, impl="triton", **kw)
    grads = _grads(out, (q, k, v), grad_out)
    base = flash_attention(q, k, v, impl="torch", **kw)  # SDPA in bf16
    base_grads = _grads(base, (q, k, v), grad_out)
    q64, k64, v64 = _fp64(q, k, v)
    ref = attention_reference(q64, k64, v64, **kw)
    ref_grads = _grads(ref, (q64, k64, v64), grad_out.double())
    assert_within_torch_error(out, base, ref, name="out")
    for name, g, bg, rg in zip("qkv", grads, base_grads, ref_grads, strict=True):
        assert_within_torch_error(g, bg, rg, name=f"d{name}")


def test_fp32_attention_is_tight():
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda") for _ in range(3))
    out = flash_attention(q, k, v, impl="triton")
    ref = attention_reference(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_softmax_norms_cross_entropy_bf16():
    x = torch.randn(2, 4, 333, 5000, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(2, 1, 333, 5000, device="cuda") < 0.2
    out = scaled_masked_softmax(x, scale=0.1, mask=mask, causal=True, impl="triton")
    ref = scaled_masked_softmax_reference(x.double(), scale=0.1, mask=mask, causal=True)
    base = scaled_masked_softmax_reference(x, scale=0.1, mask=mask, causal=True)
    assert_within_torch_error(out, base, ref, name="softmax")

    h = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda")
    out = rms_norm(h, w, impl="triton")
    base = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(h.dtype)
    ref = rms_norm(h.double(), w.double(), impl="torch")
    assert_within_torch_error(out, base, ref, name="rms_norm")
    out = layer_norm(h, w, None, impl="triton")
    base = F.layer_norm(h, (4096,), w.to(h.dtype))
    ref = layer_norm(h.double(), w.double(), None, impl="torch")
    assert_within_torch_error(out, base, ref, name="layer_norm")

    logits = torch.randn(2048, 50304, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 50304, (2048,), device="cuda")
    out = cross_entropy(logits, labels, impl="triton")
    base = F.cross_entropy(logits, labels, reduction="none")
    ref = cross_entropy(logits.double(), labels, impl="torch")
    assert_within_torch_error(out, base, ref, name="cross_entropy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_kernel_passes_its_self_test_on_this_gpu(dtype):
    """What model.kernels=auto runs on first use: each check, on this GPU, fresh."""
    failures = {op: verify.run_check(op, "cuda", dtype) for op in verify.SOURCES}
    assert all(r["passed"] for r in failures.values()), failures
