"""Cross entropy over a vocab slice in Triton: fused log-softmax statistics and gradient.

Forward (``_cross_entropy_fwd_kernel``): one program per row streams the row's
logits in blocks once and produces the partials of ``reference.CrossEntropyPartials``
(row max, sum of exp relative to that max, target logit if the label falls in
``[vocab_start, vocab_start + V_local)``, sum of logits). The running max/sum are
kept per lane and merged at the end (online softmax, Milakov & Gimelshein 2018).
The loss is then a few (N,) ops in PyTorch (after the caller's all-reduce, for
vocab parallelism).

Backward (``_cross_entropy_bwd_kernel``): one program per row writes
``g * (exp(x - lse) - (1 - eps) [j == y] - eps / V)`` block by block, from the
saved logits and the global ``lse``; no (N, V) probability matrix is ever stored
(beyond the gradient itself, which has the logits' shape and dtype).

Tested on: CPU under ``TRITON_INTERPRET=1`` (triton 3.9, torch 2.13) against
``reference.py``: fp32/fp16/bf16 logits, vocab 1..1000 (one and several blocks),
ignored rows, label smoothing, labels inside and outside a slice, NaN logits
(tests/kernels/test_cross_entropy.py).

Compiled (not run) for sm_90 with triton 3.6 and 3.9 (tests/kernels/compile_for_gpu.py).

Known limits: no GPU run recorded yet (block/warp choices untuned); the gradient
is a new tensor (no in-place reuse of the logits buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cross_entropy.reference import CrossEntropyPartials
from kernels.dispatch import interpreter_enabled

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel may read must be constexpr


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, LABELS, MAX, SUMEXP, TARGET, SUMLOGITS,
    stride_lm, n_cols, vocab_start, ignore_index,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (N,): the four slice partials of one row."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_lm
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_V], dtype=tl.float32)
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2((m - m_safe) * LOG2E) + tl.exp2((x - m_safe) * LOG2E)
        m = m_new
        total += tl.where(valid, x, 0.0)
    m_row = tl.max(m, 0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    lane_scale = tl.where(m == float("-inf"), 0.0, tl.exp2((m - m_row_safe) * LOG2E))
    label = tl.load(LABELS + row).to(tl.int64)
    local = label - vocab_start
    in_slice = (local >= 0) & (local < n_cols) & (label != ignore_index)
    target = tl.load(row_ptr + local, mask=in_slice, other=0.0).to(tl.float32)
    tl.store(MAX + row, m_row)
    tl.store(SUMEXP + row, tl.sum(l * lane_scale, 0))
    tl.store(TARGET + row, target)
    tl.store(SUMLOGITS + row, tl.sum(total, 0))


@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS, LABELS, LSE, DLOSS, DLOGITS,
    stride_lm, stride_dlm, n_cols, vocab_start, ignore_index, target_weight, smooth_weight,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (N,): dlogits = g * (exp(x - lse) - target_weight [j == y] - smooth_weight)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    g = tl.load(DLOSS + row).to(tl.float32)
    g = tl.where(label == ignore_index, 0.0, g)
    lse = tl.load(LSE + row).to(tl.float32)
    local = label - vocab_start
    row_ptr = LOGITS + row * stride_lm
    out_ptr = DLOGITS + row * stride_dlm
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        grad = tl.exp2((x - lse) * LOG2E) - smooth_weight
        grad = tl.where(cols == local, grad - target_weight, grad)
        tl.store(out_ptr + cols, (g * grad).to(DLOGITS.dtype.element_ty), mask=valid)


def block_for(n_cols: int) -> int:
    """Columns per block: up to 4096 (64 under the interpreter)."""
    cap = 64 if interpreter_enabled() else 4096
    return min(cap, max(16, triton.next_power_of_2(max(n_cols, 1))))


def _num_warps(block: int) -> int:
    return 1 if interpreter_enabled() else max(1, min(16, block // 256))


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def partials_triton(
    logits: torch.Tensor, labels: torch.Tensor, *, vocab_start: int, ignore_index: int
) -> CrossEntropyPartials:
    """Launch the forward kernel on (N, V_local) logits and (N,) labels."""
    logits, labels = _rows(logits), labels.contiguous()
    n_rows, n_cols = logits.shape
    out = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    if n_rows > 0:
        block = block_for(n_cols)
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits, labels, *out, logits.stride(0), n_cols, vocab_start, ignore_index,
            BLOCK_V=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return CrossEntropyPartials(*out)


def slice_grad_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """Launch the backward kernel; returns dlogits (N, V_local) in the logits' dtype."""
    logits, labels = _rows(logits), labels.contiguous()
    n_rows, n_cols = logits.shape
    dlogits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows > 0 and n_cols > 0:
        block = block_for(n_cols)
        _cross_entropy_bwd_kernel[(n_rows,)](
            logits, labels, lse.contiguous(), grad_loss.contiguous(), dlogits,
            logits.stride(0), dlogits.stride(0), n_cols, vocab_start, ignore_index,
            1.0 - label_smoothing, label_smoothing / vocab_size,
            BLOCK_V=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return dlogits
