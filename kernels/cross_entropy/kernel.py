"""Cross entropy over a vocab slice in Triton: fused log-softmax statistics and gradient.

Forward (``_cross_entropy_fwd_kernel``): one program per row streams the row's
logits in blocks once and produces the partials of ``reference.CrossEntropyPartials``
(row max, sum of exp relative to that max, target logit if the label falls in
``[vocab_start, vocab_start + V_local)``). The running max/sum are kept per lane
and merged at the end (online softmax, Milakov & Gimelshein 2018). The loss is
then a few (N,) ops in PyTorch (after the caller's all-reduce, for vocab
parallelism).

Backward (``_cross_entropy_bwd_kernel``): one program per row writes
``g * (exp(x - lse) - [j == y])`` block by block, from the saved logits and the
global ``lse``; no (N, V) probability matrix is ever stored (beyond the gradient
itself, which has the logits' shape and dtype).

Tested on: CPU under the Triton interpreter (triton 3.9, torch 2.13) against
``reference.py``: fp32/fp16/bf16 logits, vocab 1..1000 (one and several blocks),
labels inside and outside a slice, NaN logits (tests/kernels/test_cross_entropy.py).

Compiled (not run) for sm_90 with triton 3.9 (tests/kernels/compile_for_gpu.py).

Launchers are in ``function.py``; this file holds only ``@triton.jit`` code.

Known limits: no GPU run recorded yet (block/warp choices untuned); the gradient
is a new tensor (no in-place reuse of the logits buffer); labels are not
range-checked (an out-of-range label contributes target logit 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel may read must be constexpr


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, LABELS, MAX, SUMEXP, TARGET,
    stride_lm, n_cols, vocab_start,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (N,): the three slice partials of one row."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_lm
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2((m - m_safe) * LOG2E) + tl.exp2((x - m_safe) * LOG2E)
        m = m_new
    m_row = tl.max(m, 0)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    lane_scale = tl.where(m == float("-inf"), 0.0, tl.exp2((m - m_row_safe) * LOG2E))
    local = tl.load(LABELS + row).to(tl.int64) - vocab_start
    in_slice = (local >= 0) & (local < n_cols)
    target = tl.load(row_ptr + local, mask=in_slice, other=0.0).to(tl.float32)
    tl.store(MAX + row, m_row)
    tl.store(SUMEXP + row, tl.sum(l * lane_scale, 0))
    tl.store(TARGET + row, target)


@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS, LABELS, LSE, DLOSS, DLOGITS,
    stride_lm, stride_dlm, n_cols, vocab_start,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (N,): dlogits = g * (exp(x - lse) - [j == y])."""
    row = tl.program_id(0).to(tl.int64)
    local = tl.load(LABELS + row).to(tl.int64) - vocab_start
    g = tl.load(DLOSS + row).to(tl.float32)
    lse = tl.load(LSE + row).to(tl.float32)
    row_ptr = LOGITS + row * stride_lm
    out_ptr = DLOGITS + row * stride_dlm
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_cols
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        grad = tl.exp2((x - lse) * LOG2E)
        grad = tl.where(cols == local, grad - 1.0, grad)
        tl.store(out_ptr + cols, (g * grad).to(DLOGITS.dtype.element_ty), mask=valid)
