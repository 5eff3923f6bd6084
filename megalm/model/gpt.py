"""Decoder-only Transformer language model (Llama-style or GPT-2-style by config)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from megalm.config import ModelConfig
from megalm.model.kv_cache import KVCache
from megalm.model.layers import Block, LayerNorm, make_norm
from megalm.parallel.context import local_positions
from megalm.parallel.dropout import dropout
from megalm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_tp,
    gather_logits,
    vocab_parallel_cross_entropy,
)
from megalm.parallel.mappings import copy_to_tp, tp_rank, tp_size


def require_vocab(cfg: ModelConfig) -> None:
    """The shape checks live in :class:`ModelConfig`; only the vocabulary is filled in later."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be > 0 (it is filled in from the tokenizer)")


# How tensor parallelism splits each module (Shoeybi et al. 2019). Checked against
# the model by tests/test_tensor_parallel.py.
TP_PLAN = {
    "embed.tok_emb": "vocab",  # VocabParallelEmbedding: rows split, partial lookups all-reduced
    "embed.pos_emb": "replicated",
    "blocks.*.attn_norm": "replicated (sequence-split with SP)",
    "blocks.*.attn.wq": "column",
    "blocks.*.attn.wk": "column (replicated when n_kv_heads < tp)",
    "blocks.*.attn.wv": "column (replicated when n_kv_heads < tp)",
    "blocks.*.attn.wo": "row",
    "blocks.*.mlp_norm": "replicated (sequence-split with SP)",
    "blocks.*.mlp.w1": "column",
    "blocks.*.mlp.w3": "column",
    "blocks.*.mlp.w2": "row",
    "final_norm.norm": "replicated (sequence-split with SP)",
    "head.proj": "column over the vocabulary (llama; gpt2 reuses embed.tok_emb), vocab-parallel loss",
}


def _init_module(module: nn.Module, cfg: ModelConfig) -> None:
    """N(0, init_std) for weights; residual output projections get ``init_std / sqrt(2 n_layers)``
    (GPT-2, Radford et al. 2019, section 2.3; Megatron-LM ``scaled_init_method_normal``).
    Biases zero, norm gains one. Sharded weights are drawn at full size and sliced, so
    any TP degree gives the TP=1 weights."""
    std = cfg.init_std
    if getattr(module, "residual_proj", False):
        std = std / math.sqrt(2 * cfg.n_layers)
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        full = torch.empty(module.out_features, module.in_features)
        module.weight.data.copy_(module.shard(nn.init.normal_(full, 0.0, std)))
    elif isinstance(module, VocabParallelEmbedding):
        full = torch.empty(module.num_embeddings, module.dim)
        module.weight.data.copy_(module.shard(nn.init.normal_(full, 0.0, std)))
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
    if getattr(module, "bias", None) is not None and not isinstance(module, LayerNorm):
        nn.init.zeros_(module.bias)


def init_component(component: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialize one component from its own seed, leaving the global RNG untouched.

    Every component (embedding, each block, head) has a seed of its own, so a
    pipeline stage that builds only some of them gets exactly the weights the
    whole model has (DeepSpeed's ``seed_layers`` idea, with explicit seeds).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in component.modules():
            _init_module(module, cfg)


def component_seed(init_seed: int, index: int) -> int:
    """Seed of component ``index``: 0 embedding, 1..L blocks, L+1 head."""
    return (init_seed * 1_000_003 + index) % 2**63


class Embedding(nn.Module):
    """Tokens (B, T) -> hidden states (B, T, C), or (B, T/tp, C) with sequence parallelism.

    Vocabulary-parallel token embedding, learned positions (gpt2), hidden dropout.
    With tied embeddings its :meth:`logits` is the output head.
    """

    def __init__(
        self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False, seed: int = 0, cp_group=None
    ) -> None:
        super().__init__()
        tp = tp_size(tp_group)
        self.cfg, self.group, self.cp_group = cfg, tp_group, cp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        self.sp_group = tp_group if self.sequence_parallel else None
        self.tok_emb = VocabParallelEmbedding(
            cfg.padded_vocab(tp), cfg.d_model, tp_group, self.sequence_parallel
        )
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        init_component(self, cfg, seed)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, position_ids: (B, T) int64 (positions default to ``0..T-1``)."""
        T = tokens.size(1)
        x = self.tok_emb(tokens)  # (B, T, C), or (B, T/tp, C) with SP
        if self.pos_emb is not None:
            # positions 0..T-1, or this rank's global positions under cp
            pos = local_positions(T, self.cp_group, tokens.device) if position_ids is None else position_ids
            if self.sequence_parallel:  # this rank's tokens; the table's gradient is summed over TP
                pos = pos.chunk(tp_size(self.group), dim=-1)[tp_rank(self.group)]
            x = x + F.embedding(pos, copy_to_tp(self.pos_emb.weight, self.sp_group))
        return dropout(x, self.cfg.dropout, self.training, self.sp_group, self.cp_group)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output head: (B, T, C) full sequence -> local logits (B, T, V_padded/tp), or
        (B, T, V) at tp = 1 (:func:`head_rows`)."""
        return F.linear(x, head_rows(self.tok_emb.weight, self.cfg, self.group))


class FinalNorm(nn.Module):
    """Last norm, then leave the sequence-parallel region: (B, T/tp or T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.group, self.sequence_parallel = tp_group, sequence_parallel and tp_size(tp_group) > 1
        self.norm = make_norm(cfg, tp_group if self.sequence_parallel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return enter_tp(self.norm(x), self.group, self.sequence_parallel)


def head_rows(weight: torch.Tensor, cfg: ModelConfig, tp_group) -> torch.Tensor:
    """The output head's weight rows that get logits: at tp = 1 only the real vocabulary
    (``weight[:V]``, a contiguous view: the padded rows cost no matmul columns and the
    loss reads contiguous logits), under TP the whole shard (the logits of every rank
    must have one width for the all-gather; the loss drops the padding)."""
    padded = tp_size(tp_group) > 1 or weight.size(0) == cfg.vocab_size
    return weight if padded else weight[: cfg.vocab_size]


class Head(nn.Module):
    """Untied output head: (B, T, C) -> local logits (B, T, V_padded/tp), column-parallel;
    (B, T, V) at tp = 1 (:func:`head_rows`)."""

    def __init__(self, cfg: ModelConfig, tp_group=None, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.group = cfg, tp_group
        self.proj = ColumnParallelLinear(cfg.d_model, cfg.padded_vocab(tp_size(tp_group)), False, tp_group)
        init_component(self, cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, head_rows(self.proj.weight, self.cfg, self.group))


class LMLoss:
    """Mean next-token cross entropy from local logits (vocabulary-parallel, padding masked).

    Called as ``loss(logits, labels)`` with logits (B, T, V_padded/tp), labels (B, T). A plain
    callable, not a module (DeepSpeed's pipeline engine and its timers replace ``loss_fn``
    with functions); :meth:`compile` compiles it in place, as ``nn.Module.compile`` does.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None) -> None:
        self.cfg, self.group = cfg, tp_group
        self._run = self.forward

    def compile(self, **kwargs) -> None:
        """Run :meth:`forward` through ``torch.compile(**kwargs)`` from now on."""
        self._run = torch.compile(self.forward, **kwargs)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._run(logits, labels)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss, eager."""
        B, T, v_local = logits.shape
        loss = vocab_parallel_cross_entropy(
            logits.reshape(B * T, v_local),
            labels.reshape(B * T),
            self.group,
            tp_rank(self.group) * v_local,
            self.cfg.vocab_size,
            self.cfg.kernels,
        )
        return loss.mean()


class SeededBlock(Block):
    """A :class:`Block` initialized from its own seed (so any process can build block ``i``)."""

    def __init__(
        self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False, seed: int = 0, cp_group=None
    ) -> None:
        super().__init__(cfg, tp_group, sequence_parallel, cp_group)
        init_component(self, cfg, seed)


class GPT(nn.Module):
    """Token embedding -> ``n_layers`` pre-norm blocks -> final norm -> vocabulary head.

    ``forward(tokens, labels)`` returns the mean next-token cross entropy;
    ``forward(tokens)`` returns logits (B, T, V) over the real (unpadded) vocabulary.
    The components are the same objects the pipeline-parallel model is built from
    (``megalm/train/pipeline.py``): one model definition.

    Args:
        cfg: model shape.
        tp_group: tensor-parallel process group (``None``: unsharded model).
        sequence_parallel: split the residual stream over the sequence within the
            TP group (Korthikanti et al. 2022); norms and dropout run on T/tp tokens.
        init_seed: seeds every component's initialization; ``None`` draws it from the
            global RNG (so ``torch.manual_seed(s); GPT(cfg)`` is deterministic).
        cp_group: context-parallel process group: ``forward`` then takes this rank's tokens
            of each sequence (:mod:`megalm.parallel.context`) and returns the mean loss over
            them (averaging over the group is the data-parallel reduction's job).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group=None,
        sequence_parallel: bool = False,
        init_seed: int | None = None,
        cp_group=None,
    ) -> None:
        super().__init__()
        require_vocab(cfg)
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**62, (1,)).item())
        tp = tp_size(tp_group)
        self.cfg, self.group = cfg, tp_group
        self.sequence_parallel = sequence_parallel and tp > 1
        L = cfg.n_layers
        self.embed = Embedding(cfg, tp_group, sequence_parallel, component_seed(init_seed, 0), cp_group)
        self.blocks = nn.ModuleList(
            SeededBlock(cfg, tp_group, sequence_parallel, component_seed(init_seed, 1 + i), cp_group)
            for i in range(L)
        )
        self.final_norm = FinalNorm(cfg, tp_group, sequence_parallel)
        self.head = None if cfg.tied else Head(cfg, tp_group, component_seed(init_seed, L + 1))
        self.loss = LMLoss(cfg, tp_group)
        self.recompute_interval = 0

    def set_recompute(self, interval: int) -> None:
        """Activation checkpointing: keep only the input of every group of ``interval`` blocks
        and recompute the rest in the backward (Chen et al. 2016); 0 turns it off."""
        self.recompute_interval = interval

    def _run_blocks(
        self, x: torch.Tensor, pos=None, doc_ids=None, cache: KVCache | None = None
    ) -> torch.Tensor:
        n = self.recompute_interval
        if cache is not None:
            # Decoding runs the blocks eager: compiled ones (training.compile) would be retraced for
            # every cache length; training and held-out windows keep their compiled graphs.
            compiled = any(getattr(b, "_compiled_call_impl", None) is not None for b in self.blocks)
            with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
                for i, block in enumerate(self.blocks):
                    x = block(x, pos, doc_ids, cache.layer(i))
            return x
        if not (self.training and n > 0):
            for block in self.blocks:
                x = block(x, pos, doc_ids)
            return x
        for start in range(0, len(self.blocks), n):
            group = self.blocks[start : start + n]

            def run(h: torch.Tensor, group=group) -> torch.Tensor:
                for block in group:
                    h = block(h, pos, doc_ids)
                return h

            # preserve_rng_state (default) replays the same dropout masks in the recompute
            x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens, labels: (B, T) int64. Returns logits (B, T, V) or a scalar loss.

        position_ids, doc_ids: (B, T) int64 for packed documents (``data.document_mask``) or
        left-padded prompts: positions restart per document, attention stays inside it.
        cache: the :class:`KVCache` of incremental decoding (``megalm.model.generate``).
        """
        B, T = tokens.shape
        if self.cfg.seq_len < T:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len={self.cfg.seq_len}")
        tp = tp_size(self.group)
        if self.sequence_parallel and T % tp:
            if labels is not None:
                raise ValueError(f"sequence parallelism needs T ({T}) divisible by tp ({tp})")
            if cache is not None:
                raise ValueError("decode with a KV cache under sequence parallelism: use generate.decoding()")
            # Inference on any length: right-pad (a document of its own); causal attention keeps
            # the first T positions independent of the padding.
            pad = [F.pad(t, (0, tp - T % tp)) if t is not None else None for t in (tokens, position_ids)]
            ids = None if doc_ids is None else F.pad(doc_ids, (0, tp - T % tp), value=-1)
            return self.forward(pad[0], None, pad[1], ids)[:, :T]
        x = self.embed(tokens, position_ids)  # (B, T, C), or (B, T/tp, C) with SP
        x = self._run_blocks(x, position_ids, doc_ids, cache)
        x = self.final_norm(x)  # (B, T, C)
        logits = self.head(x) if self.head is not None else self.embed.logits(x)  # (B, T, V_padded/tp or V)
        if labels is None:
            return gather_logits(logits, self.group, self.cfg.vocab_size)
        return self.loss(logits, labels)
