"""RMSNorm / LayerNorm (Triton, interpreted on CPU) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernels import layer_norm, rms_norm
from kernels.norms import layer_norm_reference, rms_norm_reference
from kernels.tolerance import assert_close_fp32, assert_within_torch_error


def same_dtype_rms(x, weight, eps=1e-6):
    """PyTorch in the input's own dtype (the tolerance baseline)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def same_dtype_ln(x, weight, bias, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def call(norm, impl_or_fn, x, w, b):
    """Run one norm with ``impl`` (a string) or a reference function."""
    if norm == "rms":
        fn = impl_or_fn if callable(impl_or_fn) else lambda *a: rms_norm(*a, impl=impl_or_fn)
        return fn(x, w, 1e-6)
    fn = impl_or_fn if callable(impl_or_fn) else lambda *a: layer_norm(*a, impl=impl_or_fn)
    return fn(x, w, b, 1e-5)


def make(shape, dtype, device, *, bias):
    h = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(h, device=device)).requires_grad_()  # fp32 weights
    b = (0.5 * torch.randn(h, device=device)).requires_grad_() if bias else None
    return x, w, b


def fp64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def fwd_bwd(norm, impl_or_fn, x, w, b, grad_out):
    out = call(norm, impl_or_fn, x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize(
    "shape,bias", [((1, 1), True), ((3, 5, 17), True), ((7, 128), False), ((4, 1000), True)]
)
def test_fp32_forward_and_grads_match_reference(device, norm, shape, bias):
    x, w, b = make(shape, torch.float32, device, bias=bias and norm == "ln")
    grad_out = torch.randn(shape, device=device)
    out, grads = fwd_bwd(norm, "triton", x, w, b, grad_out)
    ref = rms_norm_reference if norm == "rms" else layer_norm_reference
    ref_out, ref_grads = fwd_bwd(norm, ref, *fp64(x, w, b), grad_out.double())
    assert_close_fp32(out, ref_out, name="out")
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_fp32(g, rg, name=f"grad{i}", tol=5e-5)


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_many_rows_split_over_backward_programs(device, norm):
    # 257 rows over 4 backward programs: uneven chunks, partial dw/db summed in torch.
    test_fp32_forward_and_grads_match_reference(device, norm, (257, 48), True)


@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(device, norm, dtype):
    x, w, b = make((6, 96), dtype, device, bias=norm == "ln")
    grad_out = torch.randn(6, 96, device=device)
    out, grads = fwd_bwd(norm, "triton", x, w, b, grad_out)
    base_fn = same_dtype_rms if norm == "rms" else same_dtype_ln
    base_w, base_b = (None if t is None else t.detach().to(dtype).requires_grad_() for t in (w, b))
    base_out, base_grads = fwd_bwd(norm, base_fn, x, base_w, base_b, grad_out)
    ref = rms_norm_reference if norm == "rms" else layer_norm_reference
    ref_out, ref_grads = fwd_bwd(norm, ref, *fp64(x, w, b), grad_out.double())
    assert out.dtype == dtype
    assert_within_torch_error(out, base_out, ref_out, name="out")
    for i, (g, bg, rg) in enumerate(zip(grads, base_grads, ref_grads, strict=True)):
        assert_within_torch_error(g, bg.to(g.dtype), rg, name=f"grad{i}")


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_running_twice_is_bitwise_identical(device, norm):
    x, w, b = make((37, 64), torch.bfloat16, device, bias=norm == "ln")
    runs = [fwd_bwd(norm, "triton", x, w, b, torch.ones(37, 64, device=device)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, c in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_nan_row_propagates_like_reference(device, norm):
    x, w, b = make((5, 33), torch.float32, device, bias=norm == "ln")
    x = x.detach().clone()
    x[2, 7] = float("nan")
    out = call(norm, "triton", x, w.detach(), None if b is None else b.detach())
    ref = call(norm, "torch", x, w.detach(), None if b is None else b.detach())
    assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()
    assert_close_fp32(out, ref)


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="bias"):
        layer_norm(torch.randn(2, 8), torch.ones(8), torch.ones(7))
