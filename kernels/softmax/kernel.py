"""Fused scale + mask + softmax (forward and backward) in Triton.

Replaces Megatron-LM's ``scaled_masked_softmax`` / ``scaled_upper_triang_masked_softmax``
CUDA extensions. One program per row of (B, H, Tq, Tk) scores. A row that fits in
one block is read once; longer rows use the online softmax (Milakov & Gimelshein
2018, "Online normalizer calculation for softmax", Alg. 3): pass 1 streams the row
keeping the running max ``m`` and sum ``l = sum exp(x - m)``, pass 2 writes
``exp(x - m) / l``. Backward: ``dx = scale * y * (dy - sum_j dy_j y_j)``.

Masks: an explicit bool mask (True = masked) broadcast to the scores through its
strides (stride 0 on broadcast dims, nothing materialized), and/or causal with a
query offset (key j masked for query row i when j > i + q_offset; q_offset =
Tk - Tq for the last Tq positions of a KV cache, Tk - 1 for one decode row).
Fully masked rows give zeros; a row whose unmasked entries are all -inf gives
NaN, as ``torch.softmax`` does.

Tested on: CPU under the Triton interpreter (triton 3.9, torch 2.13) against
``reference.scaled_masked_softmax_reference``: fp32/fp16/bf16, rows of 1, 17, 129
and 257 columns in one block and across several blocks, Tq != Tk, decode rows
(Tq = 1) with a causal offset, mask broadcast over batch and heads, causal, both,
fully masked rows, NaN/inf rows (tests/kernels/test_softmax.py), and as the
softmax of unfused attention against the attention reference
(tests/kernels/test_unfused_attention.py).

Compiled (not run) for sm_90 with triton 3.9 (tests/kernels/compile_for_gpu.py).

Launchers are in ``function.py``; this file holds only ``@triton.jit`` code.

Known limits: no GPU run recorded yet (block/warp choices untuned); inputs of more
than 4 dims are reshaped to 4 dims, which copies a broadcast mask.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_fwd_kernel(
    X, MASK, Y,
    stride_xb, stride_xh, stride_xm, stride_xn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    n_heads, n_rows, n_cols, scale, q_offset,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, ONE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (B * H * Tq,): one row per program. Y is contiguous (B, H, Tq, Tk)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid % n_rows
    off_h = (pid // n_rows) % n_heads
    off_b = pid // (n_rows * n_heads)
    x_row = X + off_b * stride_xb + off_h * stride_xh + row * stride_xm
    mask_row = MASK + off_b * stride_maskb + off_h * stride_maskh + row * stride_maskm
    y_row = Y + pid * n_cols
    n_visible_cols = n_cols
    if CAUSAL:
        n_visible_cols = tl.minimum(n_cols, row + 1 + q_offset)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        visible = cols < n_visible_cols
        if HAS_MASK:
            masked = tl.load(mask_row + cols * stride_maskn, mask=visible, other=1)
            visible = visible & (masked == 0)
        x = tl.load(x_row + cols * stride_xn, mask=cols < n_cols, other=0.0).to(tl.float32)
        x = tl.where(visible, x * scale, float("-inf"))
        m = tl.max(x, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2((x - m_safe) * 1.4426950408889634)
        any_visible = tl.max(visible.to(tl.int32), 0) > 0
        l = tl.where(any_visible, tl.sum(p, 0), 1.0)  # fully masked row: 0, not 0/0
        y = tl.where(any_visible, p / l, 0.0)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols)
    else:
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # per-lane running max
        l = tl.zeros([BLOCK_N], dtype=tl.float32)  # per-lane running sum
        any_visible = tl.zeros([BLOCK_N], dtype=tl.int32)
        for start in range(0, n_visible_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            visible = cols < n_visible_cols
            if HAS_MASK:
                masked = tl.load(mask_row + cols * stride_maskn, mask=visible, other=1)
                visible = visible & (masked == 0)
            x = tl.load(x_row + cols * stride_xn, mask=cols < n_cols, other=0.0).to(tl.float32)
            x = tl.where(visible, x * scale, float("-inf"))
            m_new = tl.maximum(m, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2((m - m_safe) * 1.4426950408889634) + tl.exp2((x - m_safe) * 1.4426950408889634)
            m = m_new
            any_visible = tl.maximum(any_visible, visible.to(tl.int32))
        # Merge the lanes: row max and row sum (online softmax, combine step).
        m_row = tl.max(m, 0)
        m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
        lane_scale = tl.where(m == float("-inf"), 0.0, tl.exp2((m - m_row_safe) * 1.4426950408889634))
        l_row = tl.sum(l * lane_scale, 0)
        row_visible = tl.max(any_visible, 0) > 0
        inv_l = 1.0 / tl.where(row_visible, l_row, 1.0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            visible = cols < n_visible_cols
            if HAS_MASK:
                masked = tl.load(mask_row + cols * stride_maskn, mask=visible, other=1)
                visible = visible & (masked == 0)
            x = tl.load(x_row + cols * stride_xn, mask=visible, other=0.0).to(tl.float32)
            p = tl.exp2((x * scale - m_row_safe) * 1.4426950408889634) * inv_l
            y = tl.where(visible & row_visible, p, 0.0)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _softmax_bwd_kernel(
    Y, DY, DX, n_cols, scale, ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx = scale * y * (dy - sum(dy * y)). Grid (rows,); Y, DY, DX contiguous rows."""
    pid = tl.program_id(0).to(tl.int64)
    y_row = Y + pid * n_cols
    dy_row = DY + pid * n_cols
    dx_row = DX + pid * n_cols
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        valid = cols < n_cols
        y = tl.load(y_row + cols, mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=valid, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, 0)
        tl.store(dx_row + cols, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=valid)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            valid = cols < n_cols
            y = tl.load(y_row + cols, mask=valid, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=valid, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, 0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            valid = cols < n_cols
            y = tl.load(y_row + cols, mask=valid, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=valid, other=0.0).to(tl.float32)
            dx = scale * y * (dy - dot)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=valid)
