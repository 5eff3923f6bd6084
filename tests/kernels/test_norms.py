"""RMSNorm / LayerNorm (Triton, interpreted on CPU) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_fp32, assert_within_torch_error

from kernels import layer_norm, rms_norm
from kernels.norms import layer_norm_reference, rms_norm_reference


def same_dtype_rms(x, weight, eps=1e-6, residual=None):
    """PyTorch in the input's own dtype (the tolerance baseline)."""
    h = x if residual is None else x + residual
    hx = h.to(x.dtype)
    out = hx * torch.rsqrt(hx.pow(2).mean(-1, keepdim=True) + eps) * weight
    return out if residual is None else (out, h)


def same_dtype_ln(x, weight, bias, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    out = torch.nn.functional.layer_norm(h.to(x.dtype), (x.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)


def call(norm, impl_or_fn, x, w, b, r):
    """Run one norm; returns (outputs tuple, inputs that require grad)."""
    if norm == "rms":
        fn = impl_or_fn if callable(impl_or_fn) else lambda *a: rms_norm(*a, impl=impl_or_fn)
        out = fn(x, w, 1e-6, r)
    else:
        fn = impl_or_fn if callable(impl_or_fn) else lambda *a: layer_norm(*a, impl=impl_or_fn)
        out = fn(x, w, b, 1e-5, r)
    return out if isinstance(out, tuple) else (out,)


def make(shape, dtype, device, *, bias, residual, res_dtype=None):
    h = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(h, device=device)).requires_grad_()  # fp32 weights
    b = (0.5 * torch.randn(h, device=device)).requires_grad_() if bias else None
    r = None
    if residual:
        r = torch.randn(shape, device=device).to(res_dtype or dtype).requires_grad_()
    return x, w, b, r


def grads_of(outs, inputs, grad_outs):
    return torch.autograd.grad(outs, inputs, grad_outs)


def fp64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize(
    "shape,bias,residual",
    [((1, 1), True, False), ((3, 5, 17), True, True), ((7, 128), False, True), ((4, 1000), True, False)],
)
def test_fp32_forward_and_grads_match_reference(device, norm, shape, bias, residual):
    x, w, b, r = make(shape, torch.float32, device, bias=bias and norm == "ln", residual=residual)
    inputs = [t for t in (x, w, b, r) if t is not None]
    outs = call(norm, "triton", x, w, b, r)
    grad_outs = [torch.randn_like(o) for o in outs]
    grads = grads_of(outs, inputs, grad_outs)
    x64, w64, b64, r64 = fp64(x, w, b, r)
    ref = rms_norm_reference if norm == "rms" else layer_norm_reference
    ref_outs = call(norm, ref, x64, w64, b64, r64)
    ref_inputs = [t for t in (x64, w64, b64, r64) if t is not None]
    ref_grads = grads_of(ref_outs, ref_inputs, [g.double() for g in grad_outs])
    for i, (o, ro) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close_fp32(o, ro, name=f"out{i}")
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_fp32(g, rg, name=f"grad{i}", tol=5e-5)


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_many_rows_split_over_backward_programs(device, norm):
    # 257 rows over 4 backward programs: uneven chunks, partial dw/db summed in torch.
    test_fp32_forward_and_grads_match_reference(device, norm, (257, 48), True, False)


@pytest.mark.parametrize("norm", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("res_dtype", [None, torch.float32])  # residual in x's dtype, or fp32
def test_low_precision_within_twice_torch_error(device, norm, dtype, res_dtype):
    x, w, b, r = make((6, 96), dtype, device, bias=norm == "ln", residual=True, res_dtype=res_dtype)
    inputs = [t for t in (x, w, b, r) if t is not None]
    outs = call(norm, "triton", x, w, b, r)
    grad_outs = [torch.randn_like(o) for o in outs]
    grads = grads_of(outs, inputs, grad_outs)
    base_fn = same_dtype_rms if norm == "rms" else same_dtype_ln
    base_outs = call(norm, base_fn, x, w, b, r)
    base_grads = grads_of(base_outs, inputs, grad_outs)
    x64, w64, b64, r64 = fp64(x, w, b, r)
    ref = rms_norm_reference if norm == "rms" else layer_norm_reference
    ref_outs = call(norm, ref, x64, w64, b64, r64)
    ref_inputs = [t for t in (x64, w64, b64, r64) if t is not None]
    ref_grads = grads_of(ref_outs, ref_inputs, [g.double() for g in grad_outs])
    assert outs[0].dtype == dtype and outs[1].dtype == torch.promote_types(dtype, r.dtype)
    for i, (o, bo, ro) in enumerate(zip(outs, base_outs, ref_outs, strict=True)):
        assert_within_torch_error(o, bo, ro, name=f"out{i}")
    for i, (g, bg, rg) in enumerate(zip(grads, base_grads, ref_grads, strict=True)):
        assert_within_torch_error(g, bg, rg, name=f"grad{i}")


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_running_twice_is_bitwise_identical(device, norm):
    x, w, b, r = make((37, 64), torch.bfloat16, device, bias=norm == "ln", residual=True)
    inputs = [t for t in (x, w, b, r) if t is not None]
    runs = []
    for _ in range(2):
        outs = call(norm, "triton", x, w, b, r)
        runs.append((*outs, *grads_of(outs, inputs, [torch.ones_like(o) for o in outs])))
    for a, c in zip(*runs, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_nan_row_propagates_like_reference(device, norm):
    x, w, b, _ = make((5, 33), torch.float32, device, bias=norm == "ln", residual=False)
    x = x.detach().clone()
    x[2, 7] = float("nan")
    (out,) = call(norm, "triton", x, w.detach(), None if b is None else b.detach(), None)
    (ref,) = call(norm, "torch", x, w.detach(), None if b is None else b.detach(), None)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()
    assert_close_fp32(out, ref)


def test_only_new_residual_used_in_loss(device):
    # grad of `out` is None: the backward must still produce dx, dresidual.
    x, w, _, r = make((3, 32), torch.float32, device, bias=False, residual=True)
    _, h = rms_norm(x, w, residual=r, impl="triton")
    gx, gr = torch.autograd.grad(h.sum(), (x, r))
    assert torch.equal(gx, torch.ones_like(x)) and torch.equal(gr, torch.ones_like(r))


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        layer_norm(torch.randn(2, 8), torch.ones(8), None, residual=torch.randn(3, 8))
