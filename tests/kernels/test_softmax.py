"""Scaled masked softmax (Triton, interpreted on CPU) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernels import scaled_masked_softmax
from kernels.softmax import scaled_masked_softmax_reference
from kernels.softmax.function import softmax_backward, softmax_forward
from kernels.softmax.reference import softmax_mask
from kernels.tolerance import assert_close_fp32, assert_within_torch_error


def fwd_bwd(fn, x, grad_out, **kwargs):
    out = fn(x, **kwargs)
    (grad,) = torch.autograd.grad(out, (x,), grad_out)
    return out, grad


def same_dtype_softmax(x, *, scale, mask, causal):
    """PyTorch in the input's own dtype (the tolerance baseline)."""
    masked = softmax_mask(x.shape, mask=mask, causal=causal, device=x.device)
    y = x * scale
    if masked is not None:
        y = y.masked_fill(masked, float("-inf"))
    probs = torch.softmax(y, dim=-1)
    if masked is not None:
        probs = probs.masked_fill(torch.broadcast_to(masked, y.shape).all(-1, keepdim=True), 0.0)
    return probs


def make_mask(kind, b, h, tq, tk, device):
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "keys":  # (B, 1, 1, Tk) padding mask broadcast over heads and queries
        mask = torch.rand(b, 1, 1, tk, device=device) < 0.3
        mask[0, ..., :] = True  # batch 0: every key masked -> fully masked rows
        return mask, False
    mask = torch.rand(b, 1, tq, tk, device=device) < 0.4  # (B, 1, Tq, Tk) explicit
    mask[:, :, 0, :] = True  # a fully masked row in every batch
    return mask, kind == "full+causal"


@pytest.mark.parametrize("tk", [1, 17, 129, 257])
@pytest.mark.parametrize("kind", ["none", "causal", "keys", "full", "full+causal"])
def test_fp32_forward_and_grad_match_reference(device, tk, kind):
    b, h, tq = 2, 2, 5 if tk > 17 else tk
    x = (3 * torch.randn(b, h, tq, tk, device=device)).requires_grad_()
    mask, causal = make_mask(kind, b, h, tq, tk, device)
    grad_out = torch.randn_like(x)
    kw = dict(scale=0.7, mask=mask, causal=causal)
    out, grad = fwd_bwd(scaled_masked_softmax, x, grad_out, impl="triton", **kw)
    x64 = x.detach().double().requires_grad_()
    ref, ref_grad = fwd_bwd(scaled_masked_softmax_reference, x64, grad_out.double(), **kw)
    assert_close_fp32(out, ref, name="probs")
    assert_close_fp32(grad, ref_grad, name="grad")
    if mask is not None:  # fully masked rows are exactly zero, forward and backward
        dead = torch.broadcast_to(mask, x.shape).all(-1)
        assert torch.equal(out[dead], torch.zeros_like(out[dead]))
        assert torch.equal(grad[dead], torch.zeros_like(grad[dead]))


@pytest.mark.parametrize("block", [16, 64, 512])
def test_one_block_and_multi_block_rows_agree(device, block):
    x = torch.randn(1, 2, 9, 257, device=device, requires_grad=True)
    mask = torch.rand(1, 1, 9, 257, device=device) < 0.5
    grad_out = torch.randn_like(x)
    out = softmax_forward(x.detach(), scale=0.5, mask=mask, causal=True, q_offset=3, block=block)
    grad = softmax_backward(out, grad_out, scale=0.5, block=block)
    kw = dict(scale=0.5, mask=mask, causal=True, q_offset=3)
    ref, ref_grad = fwd_bwd(scaled_masked_softmax_reference, x, grad_out, **kw)
    assert_close_fp32(out, ref, name=f"probs block={block}")
    assert_close_fp32(grad, ref_grad, name=f"grad block={block}")


@pytest.mark.parametrize("shape", [(33,), (4, 33), (3, 7, 20), (2, 2, 3, 5, 70)])
def test_any_rank_and_tq_not_equal_tk(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    causal = len(shape) >= 2
    mask = torch.rand(shape[-1], device=device) < 0.3  # broadcast over every leading dim
    grad_out = torch.randn_like(x)
    kw = dict(scale=1.3, mask=mask, causal=causal)
    out, grad = fwd_bwd(scaled_masked_softmax, x, grad_out, impl="triton", **kw)
    ref, ref_grad = fwd_bwd(scaled_masked_softmax_reference, x, grad_out, **kw)
    assert_close_fp32(out, ref, name="probs")
    assert_close_fp32(grad, ref_grad, name="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tk", [17, 129])
def test_low_precision_within_twice_torch_error(device, dtype, tk):
    x = (3 * torch.randn(2, 2, 6, tk, device=device)).to(dtype).requires_grad_()
    mask = torch.rand(2, 1, 6, tk, device=device) < 0.3
    grad_out = torch.randn_like(x)
    kw = dict(scale=0.5, mask=mask, causal=True)
    out, grad = fwd_bwd(scaled_masked_softmax, x, grad_out, impl="triton", **kw)
    base, base_grad = fwd_bwd(same_dtype_softmax, x, grad_out, **kw)
    x64 = x.detach().double().requires_grad_()
    ref, ref_grad = fwd_bwd(scaled_masked_softmax_reference, x64, grad_out.double(), **kw)
    assert out.dtype == dtype
    assert_within_torch_error(out, base, ref, name="probs")
    assert_within_torch_error(grad, base_grad, ref_grad, name="grad")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("tk", [20, 150])  # one block and several blocks
def test_nan_and_inf_propagate_like_reference(device, tk):
    x = torch.randn(1, 1, 6, tk, device=device)
    mask = torch.zeros(1, 1, 6, tk, dtype=torch.bool, device=device)
    x[0, 0, 0, 3] = float("nan")  # row 0: NaN -> NaN row
    x[0, 0, 1, :] = float("-inf")  # row 1: all -inf, unmasked -> NaN row (as torch.softmax)
    x[0, 0, 2, 5] = float("inf")  # row 2: +inf -> NaN row (inf - inf)
    x[0, 0, 3, 4] = float("nan")  # row 3: NaN under the mask -> ignored
    mask[0, 0, 3, 4] = True
    x[0, 0, 4, 1:] = float("-inf")  # row 4: one finite entry -> one-hot
    mask[0, 0, 5, :] = True  # row 5: fully masked -> zeros
    out = scaled_masked_softmax(x, mask=mask, impl="triton")
    ref = scaled_masked_softmax_reference(x, mask=mask)
    assert ref[0, 0, :3].isnan().all() and not ref[0, 0, 3:].isnan().any()
    assert_close_fp32(out, ref)


def test_running_twice_is_bitwise_identical(device):
    x = torch.randn(2, 3, 7, 100, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)
    runs = [fwd_bwd(scaled_masked_softmax, x, grad_out, causal=True, impl="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(
    "tq,tk,q_offset",
    [(1, 37, 36), (1, 150, 149), (1, 20, 5), (5, 70, 65), (6, 40, -2), (3, 300, 297)],
)  # decode rows against a KV cache, a chunk at the end of the keys, rows that see nothing
def test_causal_offset_matches_reference(device, tq, tk, q_offset):
    x = (3 * torch.randn(2, 3, tq, tk, device=device)).requires_grad_()
    mask = torch.rand(2, 1, 1, tk, device=device) < 0.2  # padded cache slots
    grad_out = torch.randn_like(x)
    kw = dict(scale=0.3, mask=mask, causal=True, q_offset=q_offset)
    out, grad = fwd_bwd(scaled_masked_softmax, x, grad_out, impl="triton", **kw)
    x64 = x.detach().double().requires_grad_()
    ref, ref_grad = fwd_bwd(scaled_masked_softmax_reference, x64, grad_out.double(), **kw)
    assert_close_fp32(out, ref, name="probs")
    assert_close_fp32(grad, ref_grad, name="grad")
    cols = torch.arange(tk, device=device)
    rows = torch.arange(tq, device=device)[:, None]
    assert not out[..., cols[None, :] > rows + q_offset].any()  # nothing past the query's position


def test_torch_path_and_bad_masks():
    x = torch.randn(2, 3, 4, 4)
    out = scaled_masked_softmax(x, causal=True)  # CPU + auto -> reference
    torch.testing.assert_close(out, scaled_masked_softmax_reference(x, causal=True))
    with pytest.raises(TypeError, match="bool"):
        scaled_masked_softmax(x, mask=torch.zeros(4, 4))
    with pytest.raises(RuntimeError):
        scaled_masked_softmax(x, mask=torch.zeros(3, 4, dtype=torch.bool))
