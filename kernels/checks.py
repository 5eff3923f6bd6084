"""The self-test of each Triton kernel: small irregular shapes, forward and backward.

Each check runs the op's Triton path (``impl="triton"``) on ``device`` in ``dtype``
against its PyTorch reference in fp64 and raises (``AssertionError`` from
:mod:`kernels.tolerance`, or whatever the launch raised) when it is wrong. The
tolerance is the suite's: fp32 within 5e-5 of the reference's scale; fp16/bf16
within 2 x PyTorch's own same-dtype error + atol. Shapes cover what the model
runs (causal, doc ids, GQA, head dims 64 and 128; rows in one block and in
several). Under the interpreter (CPU) blocks are 16-64 wide, so shorter rows
already span several of them: the long rows that need several blocks on a GPU
are shortened (:func:`_long_row`) and attention runs fewer variants, which keeps
the interpreted self-test to seconds. Inputs come from a private generator: the
self-test never moves the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.dispatch import interpreted
from kernels.tolerance import assert_close_fp32, assert_within_torch_error


def _long_row(device: str) -> int:
    """Columns that take several blocks: > 4096 compiled, > 64 interpreted."""
    return 150 if interpreted(device) else 5000


def _rand(gen: torch.Generator, shape, device: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_()


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor, **kwargs):
    out = fn(*inputs, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def _compare(name: str, got: list, base: list, ref: list, dtype: torch.dtype) -> None:
    for i, (g, b, r) in enumerate(zip(got, base, ref, strict=True)):
        what = f"{name} {'output' if i == 0 else f'grad {i}'}"
        if dtype == torch.float32:
            assert_close_fp32(g, r, name=what, tol=5e-5)
        else:
            assert_within_torch_error(g, b, r, name=what)


def _run(name: str, fn: Callable, inputs: list[torch.Tensor], dtype: torch.dtype, gen, **kwargs) -> None:
    """Triton path vs the same op's torch path (same dtype) vs the torch path in fp64."""
    out_shape = fn(*[t.detach() for t in inputs], impl="torch", **kwargs).shape
    grad_out = torch.randn(out_shape, generator=gen).to(inputs[0].device)
    got = _fwd_bwd(fn, inputs, grad_out, impl="triton", **kwargs)
    base = _fwd_bwd(fn, inputs, grad_out, impl="torch", **kwargs)
    ref64 = [t.detach().double().requires_grad_() for t in inputs]
    ref = _fwd_bwd(fn, ref64, grad_out.double(), impl="torch", **kwargs)
    _compare(name, got, base, ref, dtype)


def check_attention(device: str, dtype: torch.dtype) -> None:
    from kernels.attention import flash_attention

    gen = torch.Generator().manual_seed(0)
    # (heads q/kv, T, head dim, causal, doc ids): head dims 64 and 128 pick different GPU tiles;
    # the interpreter's tiles do not depend on them, so it runs two smaller variants.
    variants = [((4, 2), 50, 64, True, True), ((4, 2), 50, 128, True, False), ((4, 2), 50, 64, False, False)]
    if interpreted(device):
        variants = [((2, 1), 40, 32, True, True), ((2, 1), 40, 64, False, False)]
    for (hq, hkv), t, d, causal, docs in variants:
        q = _rand(gen, (1, hq, t, d), device, dtype)
        k, v = (_rand(gen, (1, hkv, t, d), device, dtype) for _ in range(2))
        doc_ids = torch.arange(t, device=device)[None] * 3 // t if docs else None  # three documents
        _run(f"attention d={d} causal={causal} docs={docs}", flash_attention, [q, k, v], dtype, gen,
             causal=causal, doc_ids=doc_ids)  # fmt: skip


def check_softmax(device: str, dtype: torch.dtype) -> None:
    from kernels.softmax import scaled_masked_softmax

    gen = torch.Generator().manual_seed(0)
    long = _long_row(device)
    for shape, masked, q_offset in (((2, 2, 5, 200), True, 0), ((1, 2, 3, long), False, long - 3)):
        x = _rand(gen, shape, device, dtype, scale=3.0)
        mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) < 0.3).to(device) if masked else None
        _run(f"softmax {shape}", scaled_masked_softmax, [x], dtype, gen,
             scale=0.5, mask=mask, causal=True, q_offset=q_offset)  # fmt: skip


def check_norms(device: str, dtype: torch.dtype) -> None:
    from kernels.norms import layer_norm, rms_norm

    gen = torch.Generator().manual_seed(0)
    for rows, hidden in ((7, 1000), (3, 4096)):
        x = _rand(gen, (rows, hidden), device, dtype)
        w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(device).requires_grad_()
        b = (0.5 * torch.randn(hidden, generator=gen)).to(device).requires_grad_()
        _run(f"rms_norm {hidden}", rms_norm, [x, w], dtype, gen)
        _run(f"layer_norm {hidden}", layer_norm, [x, w, b], dtype, gen)


def check_cross_entropy(device: str, dtype: torch.dtype) -> None:
    from kernels.cross_entropy import cross_entropy

    gen = torch.Generator().manual_seed(0)
    vocab = _long_row(device)
    logits = _rand(gen, (6, vocab), device, dtype, scale=3.0)
    labels = torch.randint(0, vocab, (6,), generator=gen).to(device)

    def loss(x: torch.Tensor, impl: str) -> torch.Tensor:
        return cross_entropy(x, labels, impl=impl)

    _run(f"cross_entropy V={vocab}", loss, [logits], dtype, gen)


CHECKS: dict[str, Callable[[str, torch.dtype], None]] = {
    "attention": check_attention,
    "softmax": check_softmax,
    "norms": check_norms,
    "cross_entropy": check_cross_entropy,
}
