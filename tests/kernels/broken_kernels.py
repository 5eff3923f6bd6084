"""A deliberately wrong Triton kernel, injected in tests to show the self-test catches it.

``_norm_fwd_kernel`` has the signature of ``kernels/norms/kernel.py``'s but
forgets the weight: ``y = x_hat`` instead of ``y = x_hat * w``. It runs without
error and returns well-shaped, finite, plausible numbers; only a comparison with
the reference shows it is wrong. Load it with ``kernels.interpreter.kernel_module``.
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
    y = xc * rstd  # the bug: no weight
    if HAS_BIAS:
        y += tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=valid)
