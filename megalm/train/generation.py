"""Generation from a pipeline-parallel model: the stages as one ``lm`` callable.

Design (pipelined decode, one step at a time): every stage keeps the KV cache of
its own blocks (block ``i`` uses ``cache.layer(i)`` whichever stage holds it).
For each step (the prefill, then one token per row), stage 0 embeds the tokens
and runs its blocks, sends the hidden states (B, T, C) to stage 1 (point-to-point,
same tp/dp coordinates), and so on; the last stage gathers the last position's
logits over TP and broadcasts them (B, 1, V) to its pipeline group. Every rank
then draws the same token from the same seeded generator
(:func:`megalm.model.generate`), so all stages feed the same token next. The
stages work in turn (no micro-batch overlap): a sample is short, and the KV cache
makes each step cost one token per stage. Data-parallel replicas do the same
work independently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.config import ModelConfig
from megalm.model.gpt import Embedding, FinalNorm, SeededBlock
from megalm.model.kv_cache import KVCache
from megalm.parallel import ParallelContext
from megalm.parallel.layers import gather_logits


class PipelineLM:
    """``lm(tokens, position_ids=, doc_ids=, cache=) -> logits (B, 1, V)`` over a DeepSpeed
    ``PipelineModule``'s stages; collective over each pipeline group (every rank calls it).

    Args:
        module: the ``PipelineModule`` of this rank's stage (layers of ``megalm.train.pipeline``).
        ctx: the process groups (pipeline neighbours, TP group for the logits).
        cfg: the model shape (``d_model`` of the hidden states sent, ``vocab_size``).
    """

    def __init__(self, module, ctx: ParallelContext, cfg: ModelConfig) -> None:
        self.module, self.ctx, self.cfg = module, ctx, cfg
        dims, pp = ctx.dims, ctx.dims.pp
        self.first, self.last = ctx.pp_rank == 0, ctx.pp_rank == pp - 1
        t, d, c = ctx.tp_rank, ctx.dp_rank, ctx.cp_rank  # the stages of this rank's pipeline
        self.prev = dims.rank_of(t, d, ctx.pp_rank - 1, c) if not self.first else None
        self.next = dims.rank_of(t, d, ctx.pp_rank + 1, c) if not self.last else None
        self.last_rank = dims.rank_of(t, d, pp - 1, c)

    @torch.no_grad()
    def __call__(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> the last position's logits (B, 1, V) on every stage."""
        B, T = tokens.shape
        param = next(self.module.parameters())
        x = tokens
        if not self.first:
            x = torch.empty(B, T, self.cfg.d_model, dtype=param.dtype, device=param.device)
            dist.recv(x, src=self.prev)
        for idx, layer in enumerate(self.module.forward_funcs, start=self.module._local_start):
            x = _run_layer(layer, idx, x, position_ids, doc_ids, cache)
        if not self.last:
            dist.send(x.contiguous(), dst=self.next)
            logits = torch.empty(B, 1, self.cfg.vocab_size, dtype=param.dtype, device=param.device)
        else:
            logits = gather_logits(x[:, -1:], self.ctx.tp_group, self.cfg.vocab_size).contiguous()
        dist.broadcast(logits, src=self.last_rank, group=self.ctx.pp_group)
        return logits


def _run_layer(
    layer, idx: int, x: torch.Tensor, position_ids, doc_ids, cache: KVCache | None
) -> torch.Tensor:
    """One pipeline layer with the generation inputs. Layer 0 is the embedding, 1..L the blocks
    (their cache index is ``idx - 1``); the base classes' forwards also serve the ``Doc*`` layers."""
    if isinstance(layer, Embedding):
        return Embedding.forward(layer, x, position_ids)
    if isinstance(layer, SeededBlock):
        return SeededBlock.forward(
            layer, x, position_ids, doc_ids, None if cache is None else cache.layer(idx - 1)
        )
    if isinstance(layer, FinalNorm):
        return FinalNorm.forward(layer, x)
    return layer(x)  # Head, or the tied embedding's logits
