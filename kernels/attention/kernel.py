"""FlashAttention-2 forward and backward in Triton.

Algorithm: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
Work Partitioning" (2023), Algorithms 1 (forward) and 2 (backward). The forward
tiles queries over programs and streams K/V blocks with the online softmax
(Milakov & Gimelshein 2018), keeping only the running row max ``m``, the running
sum ``l`` and the unnormalized output; it saves the row logsumexp. The backward
recomputes ``P = exp(S - lse)`` block by block from Q, K and the given
logsumexp, with ``delta_i = sum_d dO_id * O_id`` (Dao 2023, eq. for dS:
``dS = P * (dP - delta)``). The backward reads O and lse as inputs, so a caller
may pass the *global* O and lse of a larger attention (ring / context
parallelism: each K/V block's gradient with the combined O and lse).

Layout and features: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with any strides;
grouped-query attention reads kv head ``h // (Hq // Hkv)`` directly (no
repeated K/V in memory). The dK/dV program of a kv head loops over the query
heads of its group, so there are no atomics and results are bitwise
reproducible. Causal (top-left aligned, Tq == Tk), optional per-token document
ids for queries and keys, any softmax scale. Scores are kept in log2 units
(``s * scale * log2(e)``) so the exponentials are ``exp2``; the saved logsumexp
is converted to natural log on store and back on load (the interface unit of
flash-attn). A row that sees no key has output 0 and lse -inf.

Tested on: CPU under the Triton interpreter (triton 3.9, torch 2.13) against
``reference.py`` in fp32, fp16 and bf16, head dims 16/32/48/64/128,
T in {1, 17, 129, 257}, Tq != Tk, causal and full, with and without doc ids, GQA
groups 1/2/4, forward and all three gradients, and the backward with a global
O/lse of two K/V chunks (tests/kernels/test_attention.py,
tests/kernels/test_attention_lse.py). Compiled, not run, for sm_90 with triton 3.9
(tests/kernels/compile_for_gpu.py).

Launchers, tile selection and the ops are in ``function.py`` and ``ops.py``;
this file holds only ``@triton.jit`` code.

Known limits / not done:
* No GPU run has been recorded yet (docs/performance.md): block sizes, warps and
  stages in ``function.select_config`` are untuned first guesses, and the compiled
  kernels have never been launched.
* Head dims must be a multiple of 16 and at most 128; the public function falls
  back to PyTorch otherwise. fp64 is not supported by these kernels.
* Causal needs Tq == Tk (the causal split is on block boundaries).
* fp32 uses ``input_precision="ieee"`` for ``tl.dot`` (matches PyTorch's fp32
  matmul, slow); bf16/fp16 use the tensor cores.
* Blocks wholly masked by doc ids are still visited (masked, not skipped).
* Under the interpreter bf16 ``tl.dot`` is wrong (triton 3.9), so bf16 operands
  are rounded to bf16 and upcast to fp32 there (``UPCAST_DOT``).
* Dropout, ALiBi, sliding windows and varlen (cu_seqlens) are absent.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attention_fwd_block(
    q, m_i, l_i, acc, k_base, v_base, doc_q, dock_base, offs_m, start_n, seq_k,
    qk_scale_log2, stride_kt, stride_kd, stride_vt, stride_vd, stride_dockt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    APPLY_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One K/V block of the online softmax (Dao 2023, Alg. 1 lines 8-10)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seq_k
    mask_d = offs_d < HEAD_DIM
    kt = tl.load(
        k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
        mask=mask_n[None, :] & mask_d[:, None],
        other=0.0,
    )  # (BLOCK_D, BLOCK_N) = K^T
    v = tl.load(
        v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v_dtype = v.dtype
    if UPCAST_DOT:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale_log2  # (BLOCK_M, BLOCK_N)
    visible = mask_n[None, :]
    if APPLY_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if HAS_DOC:
        doc_k = tl.load(dock_base + offs_n * stride_dockt, mask=mask_n, other=-1)
        visible = visible & (doc_q[:, None] == doc_k[None, :])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v_dtype)
    if UPCAST_DOT:
        p = p.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, DOC_Q, DOC_K,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_docqb, stride_docqt, stride_dockb, stride_dockt,
    n_heads, seq_q, seq_k, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Tq, BLOCK_M), B * Hq): one query block of one head per program."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    off_kvh = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh
        + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # fmt: skip
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    dock_base = DOC_K + off_b * stride_dockb
    doc_q = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOC:
        doc_q = tl.load(DOC_Q + off_b * stride_docqb + offs_m * stride_docqt, mask=mask_m, other=-2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Stage 1: key blocks wholly at or below the diagonal need no causal mask.
    end_full = seq_k
    if CAUSAL:
        end_full = start_m  # Tq == Tk and BLOCK_M % BLOCK_N == 0: a block boundary
    for start_n in range(0, end_full, BLOCK_N):
        m_i, l_i, acc = _attention_fwd_block(
            q, m_i, l_i, acc, k_base, v_base, doc_q, dock_base, offs_m, start_n, seq_k,
            qk_scale_log2, stride_kt, stride_kd, stride_vt, stride_vd, stride_dockt,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_DOC, UPCAST_DOT, PRECISION,
        )  # fmt: skip
    # Stage 2 (causal only): the blocks crossing the diagonal.
    if CAUSAL:
        end_diag = tl.minimum(start_m + BLOCK_M, seq_k)
        for start_n in range(start_m, end_diag, BLOCK_N):
            m_i, l_i, acc = _attention_fwd_block(
                q, m_i, l_i, acc, k_base, v_base, doc_q, dock_base, offs_m, start_n, seq_k,
                qk_scale_log2, stride_kt, stride_kd, stride_vt, stride_vd, stride_dockt,
                HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DOC, UPCAST_DOT, PRECISION,
            )  # fmt: skip
    # A row with no visible key gives output 0 and lse -inf (it adds nothing when
    # partial results are combined through their logsumexp).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(l_safe)) * LN2)
    tl.store(
        O + off_b * stride_ob + off_h * stride_oh
        + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )  # fmt: skip
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=mask_m)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    n_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id (Dao 2023, Alg. 2 line 4). Grid as the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh
        + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh
        + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _attention_bwd_dkdv_block(
    k, v, dk, dv, q_base, do_base, lse_base, delta_base, doc_k, docq_base, offs_n, start_m,
    seq_q, qk_scale_log2, stride_qt, stride_qd, stride_dot, stride_dod, stride_docqt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    APPLY_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One query block's contribution to dK, dV (Dao 2023, Alg. 2 lines 11-16)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < HEAD_DIM
    qt = tl.load(
        q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
        mask=mask_m[None, :] & mask_d[:, None],
        other=0.0,
    )  # (BLOCK_D, BLOCK_M) = Q^T
    do = tl.load(
        do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    in_dtype = do.dtype
    if UPCAST_DOT:
        qt = qt.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0) * LOG2E  # log2 units
    delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
    st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale_log2  # (BLOCK_N, BLOCK_M) = S^T
    visible = mask_m[None, :]
    if APPLY_CAUSAL:
        visible = visible & (offs_m[None, :] >= offs_n[:, None])
    if HAS_DOC:
        doc_q = tl.load(docq_base + offs_m * stride_docqt, mask=mask_m, other=-2)
        visible = visible & (doc_k[:, None] == doc_q[None, :])
    pt = tl.where(visible, tl.exp2(st - lse[None, :]), 0.0)
    pt_in = pt.to(in_dtype)
    if UPCAST_DOT:
        pt_in = pt_in.to(tl.float32)
    dv += tl.dot(pt_in, do, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) = dP^T
    dst = pt * (dpt - delta[None, :])
    dst_in = dst.to(in_dtype)
    if UPCAST_DOT:
        dst_in = dst_in.to(tl.float32)
    dk += tl.dot(dst_in, tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_Q, DOC_K,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_docqb, stride_docqt, stride_dockb, stride_dockt,
    n_heads, n_kv_heads, seq_q, seq_k, qk_scale_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Tk, BLOCK_N), B * Hkv): one key block of one kv head per program.

    Loops over the GROUP query heads sharing this kv head, so GQA needs neither
    repeated K/V nor atomics.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_kv_heads).to(tl.int64)
    off_kvh = (pid_bh % n_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_nd = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        K + off_b * stride_kb + off_kvh * stride_kh
        + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask=mask_nd, other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + off_b * stride_vb + off_kvh * stride_vh
        + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=mask_nd, other=0.0,
    )  # fmt: skip
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    docq_base = DOC_Q + off_b * stride_docqb
    doc_k = tl.zeros([BLOCK_N], dtype=tl.int32)
    if HAS_DOC:
        doc_k = tl.load(DOC_K + off_b * stride_dockb + offs_n * stride_dockt, mask=offs_n < seq_k, other=-1)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Causal (Tq == Tk): query blocks before start_n see nothing of this key block;
    # those in [start_n, start_n + BLOCK_N) cross the diagonal; later ones see all of it.
    start_full = 0
    if CAUSAL:
        start_full = tl.minimum(start_n + BLOCK_N, seq_q)  # BLOCK_N % BLOCK_M == 0
    for g in range(GROUP):
        off_h = off_kvh * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * n_heads + off_h) * seq_q
        if CAUSAL:
            for start_m in range(start_n, start_full, BLOCK_M):
                dk, dv = _attention_bwd_dkdv_block(
                    k, v, dk, dv, q_base, do_base, LSE + row_base, DELTA + row_base, doc_k,
                    docq_base, offs_n, start_m, seq_q, qk_scale_log2, stride_qt, stride_qd,
                    stride_dot, stride_dod, stride_docqt,
                    HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_DOC, UPCAST_DOT, PRECISION,
                )  # fmt: skip
        for start_m in range(start_full, seq_q, BLOCK_M):
            dk, dv = _attention_bwd_dkdv_block(
                k, v, dk, dv, q_base, do_base, LSE + row_base, DELTA + row_base, doc_k,
                docq_base, offs_n, start_m, seq_q, qk_scale_log2, stride_qt, stride_qd,
                stride_dot, stride_dod, stride_docqt,
                HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_DOC, UPCAST_DOT, PRECISION,
            )  # fmt: skip
    dk = dk * softmax_scale  # dS is w.r.t. scale * Q K^T
    tl.store(
        DK + off_b * stride_dkb + off_kvh * stride_dkh
        + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=mask_nd,
    )  # fmt: skip
    tl.store(
        DV + off_b * stride_dvb + off_kvh * stride_dvh
        + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=mask_nd,
    )  # fmt: skip


@triton.jit
def _attention_bwd_dq_block(
    q, do, dq, lse, delta, k_base, v_base, doc_q, dock_base, offs_m, start_n, seq_k,
    qk_scale_log2, stride_kt, stride_kd, stride_vt, stride_vd, stride_dockt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    APPLY_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One key block's contribution to dQ (Dao 2023, Alg. 2 lines 11-14, 17)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seq_k
    mask_d = offs_d < HEAD_DIM
    kt = tl.load(
        k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
        mask=mask_n[None, :] & mask_d[:, None],
        other=0.0,
    )  # (BLOCK_D, BLOCK_N) = K^T
    vt = tl.load(
        v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd,
        mask=mask_n[None, :] & mask_d[:, None],
        other=0.0,
    )  # (BLOCK_D, BLOCK_N) = V^T
    in_dtype = kt.dtype
    if UPCAST_DOT:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale_log2  # (BLOCK_M, BLOCK_N)
    visible = mask_n[None, :]
    if APPLY_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if HAS_DOC:
        doc_k = tl.load(dock_base + offs_n * stride_dockt, mask=mask_n, other=-1)
        visible = visible & (doc_q[:, None] == doc_k[None, :])
    p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    ds_in = ds.to(in_dtype)
    if UPCAST_DOT:
        ds_in = ds_in.to(tl.float32)
    dq += tl.dot(ds_in, tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_Q, DOC_K,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_docqb, stride_docqt, stride_dockb, stride_dockt,
    n_heads, seq_q, seq_k, qk_scale_log2, softmax_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_DOC: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Tq, BLOCK_M), B * Hq): one query block of one head per program."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    off_kvh = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_md = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh
        + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=mask_md, other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh
        + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=mask_md, other=0.0,
    )  # fmt: skip
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * seq_q
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * LOG2E  # log2 units
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    dock_base = DOC_K + off_b * stride_dockb
    doc_q = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOC:
        doc_q = tl.load(DOC_Q + off_b * stride_docqb + offs_m * stride_docqt, mask=mask_m, other=-2)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end_full = seq_k
    if CAUSAL:
        end_full = start_m  # Tq == Tk and BLOCK_M % BLOCK_N == 0
    for start_n in range(0, end_full, BLOCK_N):
        dq = _attention_bwd_dq_block(
            q, do, dq, lse, delta, k_base, v_base, doc_q, dock_base, offs_m, start_n, seq_k,
            qk_scale_log2, stride_kt, stride_kd, stride_vt, stride_vd, stride_dockt,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_DOC, UPCAST_DOT, PRECISION,
        )  # fmt: skip
    if CAUSAL:
        end_diag = tl.minimum(start_m + BLOCK_M, seq_k)
        for start_n in range(start_m, end_diag, BLOCK_N):
            dq = _attention_bwd_dq_block(
                q, do, dq, lse, delta, k_base, v_base, doc_q, dock_base, offs_m, start_n,
                seq_k, qk_scale_log2, stride_kt, stride_kd, stride_vt, stride_vd, stride_dockt,
                HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DOC, UPCAST_DOT, PRECISION,
            )  # fmt: skip
    dq = dq * softmax_scale
    tl.store(
        DQ + off_b * stride_dqb + off_h * stride_dqh
        + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=mask_md,
    )  # fmt: skip
