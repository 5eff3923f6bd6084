"""RMSNorm and LayerNorm (forward and backward, optional fused residual add) in Triton.

One kernel pair serves both norms (``IS_RMS``). Forward: one program per row,
the whole row in one block; statistics in fp32; saves ``rstd`` (and ``mean`` for
LayerNorm). With a residual it writes ``h = x + residual`` and normalizes the
rounded ``h`` (pre-norm block; flash-attn ``layer_norm_fn`` convention).

Backward (x_hat = (x - mean) * rstd, g = w * dy, n = H):

* RMSNorm: ``dx = rstd * (g - x_hat * mean(x_hat * g))``
* LayerNorm: ``dx = rstd * (g - x_hat * mean(x_hat * g) - mean(g))``
* ``dw = sum_rows dy * x_hat``, ``db = sum_rows dy``

Each backward program walks a fixed contiguous chunk of rows and writes its own
fp32 partial ``dw``/``db`` row; PyTorch sums the partials. No atomics, so the
result is bitwise reproducible (the chunking depends only on the row count and
the device's SM count).

Tested on: CPU under ``TRITON_INTERPRET=1`` (triton 3.9, torch 2.13) against
``reference.py`` in fp32/fp16/bf16, hidden sizes 1..1000 (powers and non-powers
of two), 1-257 rows, with/without bias and residual (also fp32 residual with
bf16 input), gradients for x, weight, bias, residual (tests/kernels/test_norms.py).

Compiled (not run) for sm_90 with triton 3.6 and 3.9 (tests/kernels/compile_for_gpu.py).

Known limits: no GPU run recorded yet (warps untuned); hidden size above 32768
takes the PyTorch path (the row must fit in one block); ``weight`` is required.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.dispatch import interpreter_enabled

MAX_BLOCK = 32768


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_xm, stride_resm, stride_ym, stride_res_outm,
    n_cols, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (rows,): normalize one row; store y, rstd (and mean, and h = x + residual)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n_cols
    x = tl.load(X + row * stride_xm + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_resm + cols, mask=valid, other=0.0).to(tl.float32)
        h = (x + r).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_res_outm + cols, h, mask=valid)
        x = h.to(tl.float32)
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
    X, W, DY, DRES_OUT, DX, DRES, MEAN, RSTD, DW, DB,
    stride_xm, stride_dym, stride_dres_outm, stride_dxm, stride_dresm,
    n_rows, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_DRES: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (programs,): rows [pid * rows_per_program, ...) and one partial dw/db row.

    X is the normalized input (h when a residual was fused). DRES_OUT is the
    incoming gradient of h, added to dx; DRES receives a copy of dx (the residual's
    gradient) so the two outputs never alias.
    """
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
    dres_out_ptr = DRES_OUT + first * stride_dres_outm + cols
    dx_ptr = DX + first * stride_dxm + cols
    dres_ptr = DRES + first * stride_dresm + cols
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
        if HAS_DRES_OUT:
            dx += tl.load(dres_out_ptr, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=valid)
        if HAS_DRES:
            tl.store(dres_ptr, dx.to(DRES.dtype.element_ty), mask=valid)
        dw += dy * x_hat
        if HAS_BIAS:
            db += dy
        x_ptr += stride_xm
        dy_ptr += stride_dym
        dres_out_ptr += stride_dres_outm
        dx_ptr += stride_dxm
        dres_ptr += stride_dresm
    tl.store(DW + pid * n_cols + cols, dw, mask=valid)
    if HAS_BIAS:
        tl.store(DB + pid * n_cols + cols, db, mask=valid)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Backward programs: a fixed function of rows and device (so runs are reproducible)."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * _sm_count(device.index or 0)))
    return max(1, min(n_rows, 4))


def _num_warps(block: int) -> int:
    return 1 if interpreter_enabled() else max(1, min(16, block // 256))


def block_for(n_cols: int) -> int:
    """Columns per block (the whole row), at least 16."""
    return max(16, triton.next_power_of_2(n_cols))


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., H) -> (N, H) with unit column stride (copies only if needed)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class NormFunction(torch.autograd.Function):
    """Autograd wrapper for both norms; returns ``out`` or ``(out, h)`` with a residual."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        is_rms: bool,
    ):
        ctx.set_materialize_grads(False)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        shape, n_cols = x.shape, x.shape[-1]
        x2 = _rows(x, n_cols)
        n_rows = x2.shape[0]
        block = block_for(n_cols)
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
        res2 = h = None
        if residual is not None:
            res2 = _rows(residual, n_cols)
            h = torch.empty(
                (n_rows, n_cols),
                dtype=torch.promote_types(x.dtype, residual.dtype),
                device=x.device,
            )
        if n_rows > 0:
            _norm_fwd_kernel[(n_rows,)](
                x2, res2 if res2 is not None else x2, weight, bias if bias is not None else weight,
                y, h if h is not None else y, mean if mean is not None else rstd, rstd,
                x2.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0),
                h.stride(0) if h is not None else 0, n_cols, float(eps),
                IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                BLOCK_N=block, num_warps=_num_warps(block),
            )  # fmt: skip
        ctx.save_for_backward(h if h is not None else x2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.shape = is_rms, shape
        ctx.x_dtype = x.dtype
        ctx.res_dtype = residual.dtype if residual is not None else None
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_h: torch.Tensor | None = None):
        xin, weight, bias, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = xin.shape
        has_res = ctx.res_dtype is not None
        if grad_out is None:
            grad_out = torch.zeros(ctx.shape, dtype=ctx.x_dtype, device=xin.device)
        dy = _rows(grad_out, n_cols)
        dres_out = _rows(grad_h, n_cols) if grad_h is not None else None
        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=xin.device)
        dres = torch.empty_like(dx, dtype=ctx.res_dtype) if has_res else None
        n_programs = _num_programs(n_rows, xin.device)
        dw = torch.empty((n_programs, n_cols), dtype=torch.float32, device=xin.device)
        db = torch.empty_like(dw) if bias is not None else None
        block = block_for(n_cols)
        if n_rows > 0:
            _norm_bwd_kernel[(n_programs,)](
                xin, weight, dy, dres_out if dres_out is not None else dy, dx,
                dres if dres is not None else dx, mean if mean is not None else rstd, rstd, dw,
                db if db is not None else dw,
                xin.stride(0), dy.stride(0), dres_out.stride(0) if dres_out is not None else 0,
                dx.stride(0), dres.stride(0) if dres is not None else 0,
                n_rows, n_cols, triton.cdiv(n_rows, n_programs),
                IS_RMS=ctx.is_rms, HAS_DRES_OUT=dres_out is not None, HAS_DRES=has_res,
                HAS_BIAS=bias is not None, BLOCK_N=block, num_warps=_num_warps(block),
            )  # fmt: skip
        else:
            dw.zero_()
            if db is not None:
                db.zero_()
        grad_w = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = db.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        grad_res = dres.view(ctx.shape) if has_res else None
        return dx.view(ctx.shape), grad_w, grad_b, grad_res, None, None
