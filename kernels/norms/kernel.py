"""RMSNorm and LayerNorm, forward and backward, in Triton.

One kernel pair serves both norms (``IS_RMS``). Forward: one program per row,
the whole row in one block; statistics in fp32; saves ``rstd`` (and ``mean`` for
LayerNorm).

Backward (x_hat = (x - mean) * rstd, g = w * dy, n = H):

* RMSNorm: ``dx = rstd * (g - x_hat * mean(x_hat * g))``
* LayerNorm: ``dx = rstd * (g - x_hat * mean(x_hat * g) - mean(g))``
* ``dw = sum_rows dy * x_hat``, ``db = sum_rows dy``

Each backward program walks a fixed contiguous chunk of rows and writes its own
fp32 partial ``dw``/``db`` row; PyTorch sums the partials. No atomics, so the
result is bitwise reproducible (the chunking depends only on the row count and
the device's SM count).

Tested on: CPU under the Triton interpreter (triton 3.9, torch 2.13) against
``reference.py`` in fp32/fp16/bf16, hidden sizes 1..1000 (powers and non-powers
of two), 1-257 rows, with/without bias, gradients for x, weight, bias
(tests/kernels/test_norms.py).

Compiled (not run) for sm_90 with triton 3.9 (tests/kernels/compile_for_gpu.py).

Launchers are in ``function.py``; this file holds only ``@triton.jit`` code, and
``kernels.interpreter`` launches it compiled (CUDA) or interpreted (CPU).

Known limits: no GPU run recorded yet (warps untuned); hidden size above
``kernels.norms.MAX_HIDDEN`` takes the PyTorch path (the row must fit in one block);
``weight`` is required.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    stride_xm, stride_ym, n_cols, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (rows,): normalize one row; store y and rstd (and mean for LayerNorm)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n_cols
    x = tl.load(X + row * stride_xm + cols, mask=valid, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 0) / n_cols
        tl.store(MEAN + row, mean)
        xc = tl.where(valid, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DX, MEAN, RSTD, DW, DB,
    stride_xm, stride_dym, stride_dxm,
    n_rows, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (programs,): rows [pid * rows_per_program, ...) and one partial dw/db row."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n_cols
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    first = row_start.to(tl.int64)  # advance pointers row by row: no int32 overflow
    x_ptr = X + first * stride_xm + cols
    dy_ptr = DY + first * stride_dym + cols
    dx_ptr = DX + first * stride_dxm + cols
    for row in range(row_start, row_end):
        x = tl.load(x_ptr, mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr, mask=valid, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:  # noqa: SIM108 (a constexpr branch: MEAN must not be read for RMSNorm)
            x_hat = x * rstd
        else:
            x_hat = tl.where(valid, (x - tl.load(MEAN + row)) * rstd, 0.0)
        g = w * dy
        dx = g - x_hat * (tl.sum(x_hat * g, 0) / n_cols)
        if not IS_RMS:
            dx -= tl.sum(g, 0) / n_cols
        dx *= rstd
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=valid)
        dw += dy * x_hat
        if HAS_BIAS:
            db += dy
        x_ptr += stride_xm
        dy_ptr += stride_dym
        dx_ptr += stride_dxm
    tl.store(DW + pid * n_cols + cols, dw, mask=valid)
    if HAS_BIAS:
        tl.store(DB + pid * n_cols + cols, db, mask=valid)
