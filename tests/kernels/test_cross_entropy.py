"""Cross entropy and its vocab-slice primitives (Triton, interpreted) against PyTorch."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    cross_entropy,
    cross_entropy_partials,
    cross_entropy_slice_grad,
    vocab_parallel_cross_entropy,
)
from kernels.cross_entropy import cross_entropy_reference
from kernels.tolerance import assert_close_fp32, assert_within_torch_error


def make(n, v, dtype, device):
    logits = (3 * torch.randn(n, v, device=device)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    return logits, labels


def loss_and_grad(fn, logits, labels, grad_loss, **kwargs):
    loss = fn(logits, labels, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits, grad_loss)
    return loss, grad


@pytest.mark.parametrize("v", [1, 17, 129, 1000])
def test_fp32_loss_and_grad_match_reference(device, v):
    logits, labels = make(13, v, torch.float32, device)
    grad_loss = torch.rand(13, device=device)
    loss, grad = loss_and_grad(cross_entropy, logits, labels, grad_loss, impl="triton")
    logits64 = logits.detach().double().requires_grad_()
    ref, ref_grad = loss_and_grad(cross_entropy_reference, logits64, labels, grad_loss.double())
    assert loss.dtype == torch.float32
    assert_close_fp32(loss, ref, name="loss")
    assert_close_fp32(grad, ref_grad, name="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(device, dtype):
    logits, labels = make(16, 300, dtype, device)
    grad_loss = torch.rand(16, device=device)
    loss, grad = loss_and_grad(cross_entropy, logits, labels, grad_loss, impl="triton")

    def same_dtype(x, y):
        return F.cross_entropy(x, y, reduction="none")

    base, base_grad = loss_and_grad(same_dtype, logits, labels, grad_loss.to(dtype))
    logits64 = logits.detach().double().requires_grad_()
    ref, ref_grad = loss_and_grad(cross_entropy_reference, logits64, labels, grad_loss.double())
    assert_within_torch_error(loss, base, ref, name="loss")
    assert grad.dtype == dtype
    assert_within_torch_error(grad, base_grad, ref_grad, name="grad")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_slices_combine_to_full_loss_and_grad(device, impl):
    """Three uneven vocab slices, reduced by hand as the caller's all-reduce would."""
    n, v = 11, 203
    logits, labels = make(n, v, torch.float32, device)
    grad_loss = torch.rand(n, device=device)
    ref, ref_grad = loss_and_grad(cross_entropy_reference, logits, labels, grad_loss)
    bounds = [(0, 50), (50, 50), (50, 51), (51, v)]  # an empty and a one-column slice
    x = logits.detach()
    parts = [cross_entropy_partials(x[:, a:b], labels, vocab_start=a, impl=impl) for a, b in bounds]
    row_max = torch.stack([p.row_max for p in parts]).amax(0)
    sum_exp = sum(p.sum_exp * torch.exp(p.row_max - row_max) for p in parts)
    lse = row_max + torch.log(sum_exp)
    loss = lse - sum(p.target_logit for p in parts)
    assert_close_fp32(loss, ref, name="loss")
    grad = torch.cat(
        [
            cross_entropy_slice_grad(x[:, a:b], labels, lse, grad_loss, vocab_start=a, impl=impl)
            for a, b in bounds
        ],
        dim=1,
    )
    assert_close_fp32(grad, ref_grad, name="grad")


def test_vocab_parallel_over_two_threads_matches_full():
    """Two 'ranks' as threads with barrier-based all-reduces (torch path: the wiring)."""
    n, v = 9, 64
    logits, labels = make(n, v, torch.float32, "cpu")
    grad_loss = torch.rand(n)
    ref, ref_grad = loss_and_grad(cross_entropy_reference, logits, labels, grad_loss)
    world, barrier, slots = 2, threading.Barrier(2), [None, None]
    losses, grads = [None, None], [None, None]

    def reducer(rank, op):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = op(torch.stack(slots))
            barrier.wait()
            return out

        return all_reduce

    def run(rank):
        a, b = rank * v // world, (rank + 1) * v // world
        local = logits.detach()[:, a:b].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(
            local, labels, vocab_start=a, impl="torch",
            all_reduce_max=reducer(rank, lambda s: s.amax(0)),
            all_reduce_sum=reducer(rank, lambda s: s.sum(0)),
        )  # fmt: skip
        losses[rank] = loss.detach()
        (grads[rank],) = torch.autograd.grad(loss, local, grad_loss)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(world):
        assert_close_fp32(losses[rank], ref, name=f"loss rank {rank}")
    assert_close_fp32(torch.cat(grads, dim=1), ref_grad, name="grad")


def test_nan_row_propagates_like_reference(device):
    logits, labels = make(4, 70, torch.float32, device)
    x = logits.detach().clone()
    x[1, 5] = float("nan")
    loss = cross_entropy(x, labels, impl="triton")
    ref = cross_entropy_reference(x, labels)
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()
    assert_close_fp32(loss, ref)


def test_running_twice_is_bitwise_identical(device):
    logits, labels = make(8, 200, torch.bfloat16, device)
    runs = [
        loss_and_grad(cross_entropy, logits, labels, torch.ones(8, device=device), impl="triton")
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_leading_dims_and_int32_labels(device):
    logits = torch.randn(2, 3, 40, device=device, requires_grad=True)
    labels = torch.randint(0, 40, (2, 3), device=device, dtype=torch.int32)
    loss = cross_entropy(logits, labels, impl="triton")
    ref = cross_entropy_reference(logits.reshape(-1, 40), labels.reshape(-1)).view(2, 3)
    assert_close_fp32(loss, ref)


def test_torch_path_and_shape_errors():
    logits, labels = make(5, 10, torch.float32, "cpu")
    torch.testing.assert_close(cross_entropy(logits, labels), cross_entropy_reference(logits, labels))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(logits, labels[:4])
