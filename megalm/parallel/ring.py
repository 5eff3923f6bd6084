"""Ring attention over a context-parallel group: causal attention of a sequence split over cp ranks.

Each rank holds the queries, keys and values of its ``2c = T / cp`` tokens in the
load-balanced layout of :mod:`megalm.parallel.context` (chunks ``r`` and ``2cp-1-r``
of ``2 cp``). Key/value blocks travel around the ring (rank ``r`` sends to ``r+1`` and
receives from ``r-1``, Liu et al. 2023, "Ring Attention with Blockwise Transformers");
at step ``s`` rank ``r`` attends to the block of rank ``j = r - s`` while the next
block is already in flight (point-to-point sends overlapped with the local compute).
By chunk order the causal mask of a block pair is one of three shapes:

==========  =====================================  ==================================
block       queries x keys                         call
==========  =====================================  ==================================
``j = r``   all local x all local                  causal (positions increase along
                                                   a rank's tokens)
``j < r``   all local x first chunk of ``j``       full (its second chunk is later
                                                   than both query chunks)
``j > r``   second local chunk x all of ``j``      full (the first query chunk is
                                                   earlier than both key chunks)
==========  =====================================  ==================================

so every off-diagonal step is half a block of work on every rank (the balance).
Partial results merge through their log-sum-exp (``lse = logaddexp(lse_a, lse_b)``,
``o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse)``; Milakov & Gimelshein 2018). The
backward (FlashAttention-2's, Dao 2023, Alg. 2, given the *global* output and
log-sum-exp, ``kernels.attention_backward``) sends the K/V blocks around again; each
block's dK/dV accumulator (fp32) travels with it, from the rank after its owner around
to the owner, which adds its own share last.

Communication per layer and step, bytes sent by one rank (measured by
``launch/bench_cp_comm.py`` against :func:`megalm.perf.cp.ring_bytes_per_layer`), with
``S_kv = 2 B (T / cp) (n_kv / tp) hs e`` the bytes of one rank's K and V::

    forward   (cp - 1) S_kv            K/V blocks
    backward  (cp - 1) S_kv            K/V blocks again
              (cp - 1) S_kv * 4 / e    dK/dV accumulators, fp32

plus, with document masking, the blocks' document ids (int64) alongside each K/V hop.
Every send is counted in :data:`megalm.parallel.mappings.COMM_BYTES` under
``cp_kv``, ``cp_dkv`` and ``cp_doc_ids``.

Document masks are global: the document ids of each K/V block travel with it, and
``kernels.attention_forward`` masks by ``doc_ids[q] == kv_doc_ids[k]``; a query that
sees nothing of a block gets log-sum-exp ``-inf`` there and adds nothing. GQA: K/V keep
their ``n_kv`` heads on the wire. Both kernel paths: Triton on CUDA, the PyTorch
reference elsewhere (``impl``, as ``model.kernels``).

Tested on CPU (gloo) against single-process attention and training
(``tests/test_context_parallel.py``); not yet run on GPUs (NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels import attention_backward, attention_forward, flash_attention
from megalm.parallel.context import cp_rank, cp_size
from megalm.parallel.mappings import COMM_BYTES

_TAG_KV, _TAG_DOCS, _TAG_DKV = 0, 1, 2  # gloo matches by tag; NCCL keeps issue order


class _Ring:
    """This rank's neighbours in the cp ``group`` and non-blocking shifts to them."""

    def __init__(self, group) -> None:
        ranks = dist.get_process_group_ranks(group)
        self.group, self.size, self.rank = group, len(ranks), cp_rank(group)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def shift(self, tensors: list[tuple[torch.Tensor, int, str]]) -> _Shift:
        """Send each ``(tensor, tag, counter)`` to the next rank and receive one like it from the
        previous rank, without waiting (:meth:`_Shift.wait` returns the received tensors)."""
        ops, received = [], []
        for t, tag, counter in tensors:
            buf = torch.empty_like(t)
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group, tag))
            received.append(buf)
            COMM_BYTES[counter] += t.numel() * t.element_size()
        return _Shift(dist.batch_isend_irecv(ops), received)


class _Shift:
    def __init__(self, requests: list, received: list[torch.Tensor]) -> None:
        self.requests, self.received = requests, received

    def wait(self) -> list[torch.Tensor]:
        for req in self.requests:
            req.wait()
        return self.received


def _block(step: int, j: int, r: int, c: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the block pair (local queries, K/V of rank ``j``)."""
    everything = slice(0, 2 * c)
    if step == 0:
        return everything, everything, True
    if j < r:
        return everything, slice(0, c), False
    return slice(c, 2 * c), everything, False


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, o: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a partial attention (o, lse_b) over other keys into rows ``rows`` of (out, lse), in place."""
    lse_a = lse[:, :, rows]
    new = torch.logaddexp(lse_a, lse_b)
    out[:, :, rows] = (
        out[:, :, rows] * torch.exp(lse_a - new)[..., None] + o.float() * torch.exp(lse_b - new)[..., None]
    )
    lse[:, :, rows] = new


def _ids(ids: torch.Tensor | None, cols: slice) -> torch.Tensor | None:
    return None if ids is None else ids[:, cols]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, group, scale, impl):
        ring, c = _Ring(group), q.shape[2] // 2
        kv, kv_ids = torch.stack([k, v]), doc_ids  # one message per hop: (2, B, Hkv, 2c, D)
        out = lse = None
        for step in range(ring.size):
            j = (ring.rank - step) % ring.size
            if step < ring.size - 1:
                pending = ring.shift(_payload(kv, kv_ids))
            rows, cols, causal = _block(step, j, ring.rank, c)
            o, l_b = attention_forward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal, scale,
                doc_ids=_ids(doc_ids, rows), kv_doc_ids=_ids(kv_ids, cols), impl=impl,
            )  # fmt: skip
            if out is None:  # the diagonal block: every query sees itself, so lse is finite
                out, lse = o.float(), l_b.clone()
            else:
                _merge(out, lse, rows, o, l_b)
            if step < ring.size - 1:
                kv, *rest = pending.wait()
                kv_ids = rest[0] if rest else None
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.group, ctx.scale, ctx.impl = group, scale, impl
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        ring, c = _Ring(ctx.group), q.shape[2] // 2
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, kv_ids = torch.stack([k, v]), doc_ids
        own = sent = None
        for step in range(ring.size):
            j = (ring.rank - step) % ring.size
            if step < ring.size - 1:
                pending = ring.shift(_payload(kv, kv_ids))
            rows, cols, causal = _block(step, j, ring.rank, c)
            gq, gk, gv = attention_backward(
                grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                out[:, :, rows], lse[:, :, rows], causal, ctx.scale,
                doc_ids=_ids(doc_ids, rows), kv_doc_ids=_ids(kv_ids, cols), impl=ctx.impl,
            )  # fmt: skip
            dq[:, :, rows] += gq
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            dkv[0][:, :, cols] += gk
            dkv[1][:, :, cols] += gv
            if step == 0:
                own = dkv  # this rank's share of its own block's gradient, added when the rest returns
            else:
                if sent is not None:  # the accumulator of block j, from the ranks before this one
                    dkv += sent.wait()[0]
                sent = ring.shift([(dkv, _TAG_DKV, "cp_dkv")])  # to the next rank; last step: the owner
            if step < ring.size - 1:
                kv, *rest = pending.wait()
                kv_ids = rest[0] if rest else None
        if sent is not None:
            own += sent.wait()[0]
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None, None, None, None


def _payload(kv: torch.Tensor, ids: torch.Tensor | None) -> list[tuple[torch.Tensor, int, str]]:
    out = [(kv, _TAG_KV, "cp_kv")]
    if ids is not None:
        out.append((ids, _TAG_DOCS, "cp_doc_ids"))
    return out


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal attention of a sequence split over the cp ``group`` (module docstring).

    Args:
        q: (B, Hq, 2c, D) this rank's queries, in the layout of :mod:`megalm.parallel.context`
            (chunks ``r`` and ``2cp-1-r``), positions already applied (RoPE on global positions).
        k, v: (B, Hkv, 2c, D), Hq % Hkv == 0 (GQA).
        group: the cp process group; ``None`` or one rank: plain causal flash attention.
        doc_ids: (B, 2c) document ids of this rank's tokens (packed documents never attend
            across a boundary), or ``None``.
        softmax_scale: default ``1 / sqrt(D)``.
        impl: ``model.kernels``: "auto" | "triton" | "torch".

    Returns:
        (B, Hq, 2c, D) in q's dtype, differentiable w.r.t. q, k and v; equal to rows
        ``chunk_positions`` of the unsplit sequence's causal attention.
    """
    if cp_size(group) == 1:
        return flash_attention(q, k, v, causal=True, softmax_scale=softmax_scale, doc_ids=doc_ids, impl=impl)
    if q.shape[2] % 2 or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"ring attention needs the two equal chunks of this rank's tokens for q, k and v; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, doc_ids, group, scale, impl)
