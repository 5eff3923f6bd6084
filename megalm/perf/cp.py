"""Context parallelism's numbers: the ring's bytes per layer and what a cp rank holds.

Ring attention (``megalm/parallel/ring.py``; Liu et al. 2023) splits each sequence of
``s`` tokens over ``cp`` ranks. Per transformer layer and micro-batch (one forward +
backward), one rank sends, with ``S_kv = 2 b (s / cp) w e`` the bytes of its K and V
(``w`` = K/V width on this TP rank: ``n_kv / tp`` heads of ``hs`` channels, or one head
when ``n_kv < tp`` replicates them; ``e`` bytes per element)::

    forward             (cp - 1) S_kv          K/V blocks around the ring
    backward            (cp - 1) S_kv          the K/V blocks again
                        (cp - 1) S_kv 4 / e    dK/dV accumulators (fp32) back to their owners
    full recompute      (cp - 1) S_kv          the forward's ring once more
    document masking    (cp - 1) 8 b s / cp    int64 document ids with each K/V hop

The ring's hops go to the next rank of the cp group; every send overlaps with one
block of attention (``(s / cp)^2`` query-key pairs, half of them on off-diagonal
blocks thanks to the load-balanced layout, ``megalm/parallel/context.py``).

Everything else a cp rank holds and computes is that of a ``s / cp``-token sequence:
activations, logits and the GEMMs scale with ``s / cp`` (``local_model``), only
attention still spans the full ``s`` keys; parameters, gradients and optimizer states
are replicated over cp and partitioned by ZeRO over dp x cp.
"""

from __future__ import annotations

import dataclasses

from megalm.config import ModelConfig


def kv_width(cfg: ModelConfig, tp: int = 1) -> int:
    """K (or V) channels one TP rank holds: its ``n_kv / tp`` heads, or one replicated head."""
    heads = 1 if cfg.kv_heads < tp else cfg.kv_heads // tp
    return heads * cfg.head_size


def ring_bytes_per_layer(
    cfg: ModelConfig,
    micro_batch: int,
    cp: int,
    tp: int = 1,
    dtype_bytes: int = 2,
    recompute: str = "none",
    document_ids: bool = False,
) -> dict[str, int]:
    """Bytes one rank sends per layer and micro-batch (forward + backward), by kind (module docstring).

    Keys match the counters of :data:`megalm.parallel.mappings.COMM_BYTES`: ``cp_kv``,
    ``cp_dkv`` and ``cp_doc_ids``.
    """
    if cp == 1:
        return {"cp_kv": 0, "cp_dkv": 0, "cp_doc_ids": 0}
    local = micro_batch * (cfg.seq_len // cp)
    s_kv = 2 * local * kv_width(cfg, tp) * dtype_bytes
    forwards = 2 if recompute == "full" else 1
    return {
        "cp_kv": (cp - 1) * s_kv * (forwards + 1),
        "cp_dkv": (cp - 1) * s_kv * 4 // dtype_bytes,
        "cp_doc_ids": (cp - 1) * 8 * local * (forwards + 1) if document_ids else 0,
    }


def ring_hop_bytes(cfg: ModelConfig, micro_batch: int, cp: int, tp: int = 1, dtype_bytes: int = 2) -> int:
    """``S_kv``: bytes of one K/V block hop (one rank's K and V)."""
    return 2 * micro_batch * (cfg.seq_len // cp) * kv_width(cfg, tp) * dtype_bytes


def local_model(cfg: ModelConfig, cp: int) -> ModelConfig:
    """The model as one cp rank sees it for activation memory: sequences of ``s / cp`` tokens
    (``megalm.perf.memory`` functions then give the per-rank activation bytes)."""
    return cfg if cp == 1 else dataclasses.replace(cfg, seq_len=cfg.seq_len // cp)


def measure_ring_bytes_per_layer(
    cfg: ModelConfig,
    micro_batch: int,
    cp_group,
    tp_group=None,
    sequence_parallel: bool = False,
    recompute: bool = False,
) -> dict[str, int]:
    """Counted ring bytes per layer: a 2-layer minus a 1-layer model, one forward + backward.

    Runs on every rank of the cp (and tp) groups; counts what this rank sends
    (:data:`megalm.parallel.mappings.COMM_BYTES`, ``cp_*`` keys).
    """
    import torch

    from megalm.model import GPT
    from megalm.parallel.context import cp_rank, cp_size, shard_sequence
    from megalm.parallel.mappings import COMM_BYTES

    cp, rank = cp_size(cp_group), cp_rank(cp_group)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len), generator=gen)
    totals = []
    for layers in (1, 2):
        model = GPT(dataclasses.replace(cfg, n_layers=layers), tp_group, sequence_parallel, 0, cp_group)
        model.set_recompute(1 if recompute else 0)
        local = shard_sequence(tokens, cp, rank)
        COMM_BYTES.clear()
        model(local, local).backward()
        totals.append({k: v for k, v in COMM_BYTES.items() if k.startswith("cp_")})
    keys = ("cp_kv", "cp_dkv", "cp_doc_ids")
    return {k: totals[1].get(k, 0) - totals[0].get(k, 0) for k in keys}
