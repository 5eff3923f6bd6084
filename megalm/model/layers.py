"""Transformer building blocks: norms, rotary embeddings, attention, MLPs.

Plain ``nn.Module`` code; a model built from these with TP=1, PP=1 is an
ordinary PyTorch model. Shapes use B=batch, T=sequence, C=d_model,
nh=query heads, nkv=key/value heads, hs=head size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels import flash_attention, layer_norm, rms_norm, unfused_attention, use_triton
from megalm.config import ModelConfig
from megalm.model.kv_cache import LayerCache
from megalm.parallel.context import cp_size, local_positions
from megalm.parallel.dropout import dropout
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp
from megalm.parallel.mappings import copy_to_tp, tp_rank, tp_size
from megalm.parallel.ring import ring_attention


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's forward: (y (..., C) in x's dtype, rstd (..., 1) in the compute dtype)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)  # (..., C)
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)  # (..., 1)
    rstd = torch.rsqrt(norm.square_().div_(x.size(-1)).add_(eps))  # (..., 1)
    return (xf * rstd).mul_(weight.to(compute)).to(x.dtype), rstd


def fused_projection(
    owner: nn.Module, pieces: Callable[[], list[tuple[torch.Tensor, torch.Tensor | None]]], x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Linear projections that share the input ``x`` (..., C), as ONE GEMM while decoding.

    ``pieces()`` gives each projection's (weight (n_i, C), bias (n_i,) or None); their
    concatenation is made on the first call and kept on ``owner`` until
    :func:`megalm.model.decoding` ends (``owner.decode_fused``). A decode step multiplies
    one row per sequence, so each GEMM is mostly fixed cost: q/k/v as one and SwiGLU's
    W1/W3 as one take 29 GEMM calls per llama token down to 17. Returns the (..., n_i) outputs.
    """
    fused = owner.decode_fused
    if fused is None or fused is True:
        weights, biases = zip(*pieces(), strict=True)
        bias = None if biases[0] is None else torch.cat(biases)
        fused = owner.decode_fused = (torch.cat(weights), bias, [w.size(0) for w in weights])
    weight, bias, sizes = fused
    return F.linear(x, weight, bias).split(sizes, dim=-1)


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether ZeRO-3 partitions ``module``'s parameters (DeepSpeed marks each with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def set_decode_fusion(module: nn.Module, on: bool) -> None:
    """Let every attention and SwiGLU MLP under ``module`` fuse its projections (on), or drop
    the fused weights (off). Off for ZeRO-3 (parameters gathered only inside each forward: a
    kept concatenation would hold the whole layer unpartitioned)."""
    partitioned = zero3_partitioned(module)
    for m in module.modules():
        if isinstance(m, Attention) or (isinstance(m, MLP) and m.w3 is not None):
            m.decode_fused = True if on and not partitioned else None


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm's PyTorch path with a hand-written backward (fewer passes than autograd's).

    With ``r = (mean_c x_c^2 + eps)^(-1/2)`` per row and ``y = x r w``:
    ``dw = sum_n r_n (g x)_n`` and ``dx = r (g w) - x (r^3 / C) sum_c (g x)_c w_c``.
    Forward: one read for ``r`` (``vector_norm``), two writes for ``y``. Backward: four
    writes of (N, C) (``g x``, ``g w``, two in place) and two matrix-vector products for the
    reductions, against about ten passes when autograd differentiates the reference
    formula (:func:`kernels.rms_norm_reference`). Statistics and products in fp32 (fp64
    for fp64 input), rounded once to ``x``'s dtype, as the reference does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        compute, C = rstd.dtype, x.size(-1)
        xf, g, w = x.to(compute).reshape(-1, C), grad.to(compute).reshape(-1, C), weight.to(compute)
        r = rstd.reshape(-1, 1)  # (N, 1)
        gx = g * xf  # (N, C)
        dw = (r.T @ gx).reshape(C)  # sum_n r_n (g x)_n
        coef = (gx @ w)[:, None] * r.pow(3) / C  # (N, 1): (r^3 / C) sum_c (g x)_c w_c
        dx = (g * w).mul_(r).addcmul_(xf, coef, value=-1.0)  # (N, C)
        return dx.reshape(x.shape).to(x.dtype), dw.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x^2) + eps) * g``.

    Triton kernel where :func:`kernels.use_triton` allows it, else :class:`_RMSNormFunction`.
    ``sp_group``: with sequence parallelism each rank normalizes its own tokens, so
    the gain's gradient is summed over the TP group (:func:`copy_to_tp`).
    """

    def __init__(self, dim: int, eps: float = 1e-5, sp_group=None, kernels: str = "auto") -> None:
        super().__init__()
        self.eps, self.sp_group, self.kernels = eps, sp_group, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C); statistics in fp32."""
        w = copy_to_tp(self.weight, self.sp_group)
        if use_triton(self.kernels, x, w, op="norms"):
            return rms_norm(x, w, self.eps, impl=self.kernels)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _RMSNormFunction.apply(x, w, self.eps)
        return _rms_norm(x, w, self.eps)[0]  # evaluation, decoding: the same arithmetic, no autograd node


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) with gain and bias; ``sp_group`` as in :class:`RMSNorm`.

    Triton kernel where :func:`kernels.use_triton` allows it, else ``F.layer_norm`` (one
    fused kernel each way, statistics in fp32; the reference formula differentiated by
    autograd took a dozen passes).
    """

    def __init__(self, dim: int, eps: float = 1e-5, sp_group=None, kernels: str = "auto") -> None:
        super().__init__()
        self.eps, self.sp_group, self.kernels = eps, sp_group, kernels
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., C) -> (..., C)."""
        w, b = copy_to_tp(self.weight, self.sp_group), copy_to_tp(self.bias, self.sp_group)
        if use_triton(self.kernels, x, w, b, op="norms"):
            return layer_norm(x, w, b, self.eps, impl=self.kernels)
        return F.layer_norm(x, w.shape, w, b, self.eps)


def make_norm(cfg: ModelConfig, sp_group=None) -> nn.Module:
    """RMSNorm for llama, LayerNorm (with bias) for gpt2."""
    if cfg.family == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps, sp_group, cfg.kernels)
    return LayerNorm(cfg.d_model, cfg.norm_eps, sp_group, cfg.kernels)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34), rotate-half layout.

    For position m and channel pair (i, i + hs/2) with frequency
    ``theta_i = base^(-2i/hs)``: ``x'_i = x_i cos(m theta_i) - x_{i+hs/2} sin(m theta_i)``.
    Positions are ``0..T-1``, or per token from ``position_ids`` (restarting at each
    packed document, or offset by the left padding and the KV cache in generation).
    """

    def __init__(self, head_size: int, max_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, nh, T, hs), k: (B, nkv, T, hs) -> both rotated by position.

        position_ids: (B, T) int64, or None for ``0..T-1``.
        """
        if position_ids is None:
            T = q.size(-2)
            cos, sin = self.cos[:T], self.sin[:T]  # (T, hs)
        else:
            cos, sin = (
                self.cos[position_ids].unsqueeze(1),
                self.sin[position_ids].unsqueeze(1),
            )  # (B, 1, T, hs)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention (Ainslie et al. 2023 for GQA).

    Tensor parallel (Shoeybi et al. 2019, Fig. 3b): query heads are split over TP
    ranks (``wq`` column-parallel, ``wo`` row-parallel). Key/value heads are split
    too when ``n_kv_heads >= tp``; when ``n_kv_heads < tp`` each rank computes the
    one K/V head its query heads use from a replicated ``wk``/``wv`` whose gradient
    is summed over TP.

    The core ``softmax(q k^T / sqrt(hs) + mask) v`` (:meth:`_attend`) takes one path:

    ========================  ==============================================================
    path                      when
    ========================  ==============================================================
    flash                     ``model.attention=flash``: FlashAttention-2 in Triton on CUDA,
                              SDPA elsewhere (``model.kernels``)
    unfused                   ``model.attention=unfused``: ``q k^T`` -> fused scale-mask-softmax
                              kernel -> ``P v`` (Megatron's FusedScaleMaskSoftmax path)
    cached decode             generation with a :class:`megalm.model.kv_cache.KVCache` holding
                              earlier tokens: the new rows against the cache, unfused
    ========================  ==============================================================

    Every path takes ``doc_ids`` (B, T): a token attends only to tokens of its own
    document (packed windows, left-padded prompts).

    Context parallel (``cp_group``, training and held-out loss): the input holds this rank's
    tokens of each sequence (:mod:`megalm.parallel.context`); RoPE takes their global
    positions (``position_ids`` from the loader, else :func:`local_positions`) and the
    flash and unfused paths both become :func:`megalm.parallel.ring.ring_attention` over
    the cp group (same math, blockwise; its blocks use ``model.kernels``' kernels). The
    cached decode path runs without cp (:func:`megalm.model.decoding` turns it off, every
    cp rank then computes the whole sequence).
    """

    def __init__(self, cfg: ModelConfig, group=None, sequence_parallel: bool = False, cp_group=None) -> None:
        super().__init__()
        tp = tp_size(group)
        C, hs, n_kv = cfg.d_model, cfg.head_size, cfg.kv_heads
        self.group, self.sequence_parallel, self.head_size = group, sequence_parallel, hs
        self.cp_group = cp_group if cp_size(cp_group) > 1 else None
        self.local_heads = cfg.n_heads // tp
        self.kv_replicated = n_kv < tp
        self.local_kv_heads = 1 if self.kv_replicated else n_kv // tp
        bias = cfg.family == "gpt2"
        self.wq = ColumnParallelLinear(C, C, bias, group)
        if self.kv_replicated:
            # Whole (unsplit) projections on every rank: group=None.
            self.wk = ColumnParallelLinear(C, n_kv * hs, bias, None)
            self.wv = ColumnParallelLinear(C, n_kv * hs, bias, None)
            kv_index = tp_rank(group) // (tp // n_kv)
            self.kv_rows = slice(kv_index * hs, (kv_index + 1) * hs)
        else:
            self.wk = ColumnParallelLinear(C, n_kv * hs, bias, group)
            self.wv = ColumnParallelLinear(C, n_kv * hs, bias, group)
        self.wo = RowParallelLinear(C, C, bias, group, sequence_parallel)
        self.wo.residual_proj = True  # scaled init, see GPT._init_weights
        self.rotary = Rotary(hs, cfg.seq_len, cfg.rope_theta) if cfg.family == "llama" else None
        self.kernels, self.attention = cfg.kernels, cfg.attention
        self.decode_fused: object = None  # set_decode_fusion: True, then (weight, bias, sizes)

    def _qkv_pieces(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's q, k, v projection rows (k/v: the replicated head's rows when kv < tp)."""
        rows = self.kv_rows if self.kv_replicated else slice(None)
        kv = [(p.weight[rows], None if p.bias is None else p.bias[rows]) for p in (self.wk, self.wv)]
        return [(self.wq.weight, self.wq.bias), *kv]

    def _kv(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.kv_replicated:
            return proj(x)
        w = copy_to_tp(proj.weight, self.group)[self.kv_rows]
        b = copy_to_tp(proj.bias, self.group)[self.kv_rows] if proj.bias is not None else None
        return F.linear(x, w, b)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C), or (B, T/tp, C) with SP -> same shape.

        position_ids, doc_ids: (B, T) int64 over the full sequence, or None (positions
        ``0..T-1``, one document); under cp, of this rank's tokens (positions default to
        their global ones). cache: this layer's view of a KV cache (generation).
        """
        if cache is not None and self.cp_group is not None:
            raise ValueError("decode with a KV cache under context parallelism: use generate.decoding()")
        x = enter_tp(x, self.group, self.sequence_parallel)  # (B, T, C)
        B, T, _ = x.shape
        hs = self.head_size
        if self.decode_fused is not None:
            q, k, v = fused_projection(self, self._qkv_pieces, x)
        else:
            q, k, v = self.wq(x), self._kv(self.wk, x), self._kv(self.wv, x)
        q = q.reshape(B, T, self.local_heads, hs).transpose(1, 2)  # (B, nh/tp, T, hs)
        k = k.reshape(B, T, self.local_kv_heads, hs).transpose(1, 2)  # (B, nkv', T, hs)
        v = v.reshape(B, T, self.local_kv_heads, hs).transpose(1, 2)  # (B, nkv', T, hs)
        if self.rotary is not None:
            if position_ids is None and self.cp_group is not None:  # this rank's global positions
                position_ids = local_positions(T, self.cp_group, x.device)[None]  # (1, T)
            q, k = self.rotary(q, k, position_ids)
        y = self._attend(q, k, v, doc_ids) if cache is None else self._attend_cached(q, k, v, doc_ids, cache)
        y = y.transpose(1, 2).reshape(B, T, self.local_heads * hs)  # (B, T, C/tp)
        return self.wo(y)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Causal self-attention of one window: q (B, nh', T, hs), k/v (B, nkv', T, hs) -> (B, nh', T, hs).

        GQA without repeating K/V on every path. Under cp, T is this rank's tokens and the
        keys of the whole sequence come around the ring.
        """
        if self.cp_group is not None:
            return ring_attention(q, k, v, self.cp_group, doc_ids=doc_ids, impl=self.kernels)
        if self.attention == "unfused":
            return unfused_attention(q, k, v, causal=True, doc_ids=doc_ids, impl=self.kernels)
        return flash_attention(q, k, v, causal=True, doc_ids=doc_ids, impl=self.kernels)

    def _attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_ids: torch.Tensor | None,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Store the new k/v in the cache; attend the T new queries to every stored key.

        The first call (prefill, empty cache) takes the window path :meth:`_attend`, so
        its output is the no-cache forward's; later calls (decode, usually T = 1) take
        :func:`kernels.unfused_attention` with the queries as the last T positions
        (``q_offset = Tk - T``) and the cache's document ids masking other documents
        (left padding).
        """
        empty = cache.length == 0
        k_all, v_all, kv_doc_ids = cache.update(k, v)  # (B, nkv', L + T, hs), (B, L + T) or None
        if empty:
            return self._attend(q, k, v, doc_ids)
        return unfused_attention(
            q, k_all, v_all, causal=True, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids, impl=self.kernels
        )


class MLP(nn.Module):
    """Position-wise MLP: SwiGLU ``W2 (silu(W1 x) * W3 x)`` (llama) or ``W2 gelu(W1 x)`` (gpt2).

    Tensor parallel: ``W1``/``W3`` column-parallel, ``W2`` row-parallel, so the
    nonlinearity runs on local columns without communication.
    """

    def __init__(self, cfg: ModelConfig, group=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        hidden = cfg.ffn_size  # ModelConfig.ffn_size: 4d (gpt2) or SwiGLU's 8d/3
        gated = cfg.family == "llama"
        self.group, self.sequence_parallel = group, sequence_parallel
        self.w1 = ColumnParallelLinear(cfg.d_model, hidden, not gated, group)
        self.w3 = ColumnParallelLinear(cfg.d_model, hidden, False, group) if gated else None
        self.w2 = RowParallelLinear(hidden, cfg.d_model, not gated, group, sequence_parallel)
        self.w2.residual_proj = True
        self.decode_fused: object = None  # set_decode_fusion (SwiGLU's W1/W3 as one GEMM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C), or (B, T/tp, C) with SP -> same shape."""
        x = enter_tp(x, self.group, self.sequence_parallel)
        if self.w3 is not None and self.decode_fused is not None:
            gate, up = fused_projection(self, lambda: [(self.w1.weight, None), (self.w3.weight, None)], x)
            return self.w2(F.silu(gate) * up)
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: ``x + Attn(N(x))`` then ``x + MLP(N(x))``."""

    def __init__(self, cfg: ModelConfig, group=None, sequence_parallel: bool = False, cp_group=None) -> None:
        super().__init__()
        self.sp_group = group if sequence_parallel else None
        self.cp_group = cp_group
        self.dropout = cfg.dropout
        self.attn_norm = make_norm(cfg, self.sp_group)
        self.attn = Attention(cfg, group, sequence_parallel, cp_group)
        self.mlp_norm = make_norm(cfg, self.sp_group)
        self.mlp = MLP(cfg, group, sequence_parallel)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C), or (B, T/tp, C) with SP -> same shape; the rest as in :meth:`Attention.forward`."""
        a = self.attn(self.attn_norm(x), position_ids, doc_ids, cache)
        x = x + dropout(a, self.dropout, self.training, self.sp_group, self.cp_group)
        return x + dropout(
            self.mlp(self.mlp_norm(x)), self.dropout, self.training, self.sp_group, self.cp_group
        )
