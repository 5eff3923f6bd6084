"""The layout rules: which (model, tp, pp, cp, dp, ZeRO, batch, world) combinations can be built.

One function, :func:`layout_problems`, returns every problem of a combination; the
trainer (:func:`check_layout`, before any process group exists), the planner
(``megalm/perf/plan.py``) and the benchmark sweep all call it, so they never disagree.
Ranges of single keys (``n_heads > 0``, ``dropout in [0, 1)``, intervals > 0) are the
config dataclasses' job (``megalm/config/schema.py``); the rules here combine keys.

Rules (each message names the values and the fix):

==================  =============================================================
rule                why
==================  =============================================================
world % (tp*pp*cp)  the world is tp x cp x dp x pp ranks (``ParallelDims``)
heads % tp          query heads are split over TP ranks (Megatron, Shoeybi 2019)
kv heads vs tp      K/V heads are split (n_kv >= tp) or replicated (n_kv < tp)
ffn % tp            the MLP width is split by column/row-parallel projections
seq % tp (SP)       sequence parallelism splits every sequence (this rank's
                    ``seq_len / cp`` tokens with cp) over TP ranks
seq % 2cp           context parallelism cuts every sequence into ``2 cp`` equal
                    chunks, rank ``i`` taking chunks ``i`` and ``2cp-1-i`` so each
                    rank has the same causal-attention work (Megatron-core,
                    torchtitan; ``megalm/parallel/context.py``)
pp <= layers        every pipeline stage needs a transformer block; stages may be
                    uneven (DeepSpeed balances ``type:SeededBlock``)
zero with pp        DeepSpeed's pipeline engine supports ZeRO-0/1 only
batch               ``global_batch = micro_batch x accumulation x dp``
lstm split          ``model.family=lstm`` runs with data parallelism and ZeRO only:
                    no tensor/pipeline/context split, no block recompute
==================  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from megalm.config import Config, ConfigError, ModelConfig


@dataclass(frozen=True)
class Layout:
    """One way to split a run: parallel degrees, ZeRO stage, micro-batch, SP, recompute."""

    tp: int
    pp: int
    dp: int
    zero: int = 0
    micro_batch: int = 1
    sp: bool = False
    recompute: str = "none"
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def short(self) -> str:
        sp = "+sp" if self.sp else ""
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return (
            f"tp={self.tp}{sp}{cp} pp={self.pp} dp={self.dp} zero={self.zero} mb={self.micro_batch} "
            f"recompute={self.recompute}"
        )


@dataclass(frozen=True)
class Problem:
    """A broken rule: ``rule`` is its short name (the planner groups by it), ``message`` the
    sentence a user reads (values and the fix)."""

    rule: str
    message: str


def world_problem(world_size: int, tp: int, pp: int, cp: int = 1) -> Problem | None:
    """The world must factor as ``tp x cp x dp x pp``."""
    if world_size % (tp * pp * cp) == 0:
        return None
    dp = max(1, world_size // (tp * pp * cp))
    if cp == 1:
        return Problem(
            "world % (tp*pp)",
            f"tp({tp}) * pp({pp}) * dp({dp}) != world_size({world_size}): the world size must be a "
            f"multiple of tp * pp = {tp * pp}",
        )
    return Problem(
        "world % (tp*pp*cp)",
        f"tp({tp}) * cp({cp}) * pp({pp}) * dp({dp}) != world_size({world_size}): the world size must "
        f"be a multiple of tp * cp * pp = {tp * cp * pp}",
    )


def _lstm_rules(lay: Layout) -> list[Problem]:
    """The recurrent baseline is replicated whole on every rank (DP and ZeRO shard its states)."""
    out = []
    if lay.tp > 1:
        out.append(
            Problem(
                "lstm split",
                f"parallel.tp={lay.tp} with model.family=lstm: an LSTM layer has no tensor-parallel "
                "split (each step's gates need the whole hidden state); use parallel.tp=1 (data parallelism "
                "and ZeRO)",
            )
        )
    if lay.pp > 1:
        out.append(
            Problem(
                "lstm split",
                f"parallel.pp={lay.pp} with model.family=lstm: the LSTM baseline is not split into pipeline "
                "stages; use parallel.pp=1 (data parallelism and ZeRO)",
            )
        )
    if lay.cp > 1:
        out.append(
            Problem(
                "lstm split",
                f"parallel.cp={lay.cp} with model.family=lstm: the recurrence reads the sequence in order, "
                "so it cannot be split over context-parallel ranks; use parallel.cp=1",
            )
        )
    if lay.recompute != "none":
        out.append(
            Problem(
                "lstm split",
                f"training.recompute={lay.recompute} with model.family=lstm: activation recompute "
                "checkpoints transformer blocks; use training.recompute=none",
            )
        )
    return out


def _model_rules(m: ModelConfig, lay: Layout) -> list[Problem]:
    if m.family == "lstm":
        return _lstm_rules(lay)
    tp, out = lay.tp, []
    if m.n_heads % tp:
        out.append(
            Problem("heads % tp", f"model.n_heads ({m.n_heads}) must be divisible by parallel.tp ({tp})")
        )
    if m.kv_heads % tp and tp % m.kv_heads:
        out.append(
            Problem(
                "kv heads vs tp",
                f"model.n_kv_heads ({m.kv_heads}) and parallel.tp ({tp}): one must divide the other (split "
                "K/V heads when n_kv_heads >= tp, replicate them when n_kv_heads < tp)",
            )
        )
    if m.ffn_size % tp:
        out.append(Problem("ffn % tp", f"MLP width ({m.ffn_size}) must be divisible by parallel.tp ({tp})"))
    out += _sequence_rules(m, lay)
    if lay.pp > m.n_layers:
        out.append(
            Problem(
                "pp > layers",
                f"parallel.pp ({lay.pp}) is larger than model.n_layers ({m.n_layers}): every pipeline "
                "stage needs at least one transformer block",
            )
        )
    return out


def _sequence_rules(m: ModelConfig, lay: Layout) -> list[Problem]:
    """How a sequence splits: ``2 cp`` balanced chunks, then this rank's tokens over TP (SP)."""
    tp, cp, out = lay.tp, lay.cp, []
    if cp > 1 and m.seq_len % (2 * cp):
        out.append(
            Problem(
                "seq % 2cp",
                f"model.seq_len ({m.seq_len}) must be divisible by 2 * parallel.cp = {2 * cp}: context "
                f"parallelism cuts each sequence into {2 * cp} equal chunks and gives rank i chunks i and "
                f"{2 * cp - 1}-i (equal causal-attention work per rank); pick a seq_len that is a multiple "
                f"of {2 * cp} or a smaller parallel.cp",
            )
        )
    elif lay.sp and cp == 1 and m.seq_len % tp:
        out.append(
            Problem(
                "seq % tp",
                f"model.seq_len ({m.seq_len}) must be divisible by parallel.tp ({tp}) with "
                "parallel.sequence_parallel=true",
            )
        )
    elif lay.sp and (m.seq_len // cp) % tp:
        out.append(
            Problem(
                "seq % tp",
                f"each context-parallel rank's {m.seq_len // cp} tokens (model.seq_len {m.seq_len} / "
                f"parallel.cp {cp}) must be divisible by parallel.tp ({tp}) with "
                f"parallel.sequence_parallel=true; pick a seq_len that is a multiple of {2 * cp * tp}",
            )
        )
    return out


def layout_problems(model: ModelConfig, layout: Layout, global_batch: int) -> list[Problem]:
    """Every rule ``layout`` breaks for ``model`` and ``global_batch`` (empty: it can be built)."""
    out = _model_rules(model, layout)
    if layout.pp > 1 and layout.zero > 1:
        out.append(
            Problem(
                "zero with pp",
                f"zero.stage={layout.zero} with parallel.pp={layout.pp}: DeepSpeed's pipeline engine "
                "supports ZeRO-1 only (stages 2/3 shard gradients that the pipeline accumulates across "
                "micro-batches); use zero.stage=1 with pipeline parallelism, or parallel.pp=1 with ZeRO-2/3",
            )
        )
    if global_batch % (layout.micro_batch * layout.dp):
        out.append(
            Problem(
                "batch",
                f"training.global_batch ({global_batch}) must be divisible by training.micro_batch "
                f"({layout.micro_batch}) * dp ({layout.dp}); pick a global batch that is a multiple of "
                f"{layout.micro_batch * layout.dp}",
            )
        )
    return out


def config_layout(cfg: Config, world_size: int) -> Layout:
    """The :class:`Layout` a config asks for on ``world_size`` ranks (``dp`` derived)."""
    p = cfg.parallel
    return Layout(
        tp=p.tp,
        pp=p.pp,
        dp=max(1, world_size // (p.tp * p.pp * p.cp)),
        zero=cfg.zero.stage,
        micro_batch=cfg.training.micro_batch,
        sp=p.sequence_parallel and p.tp > 1,
        recompute=cfg.training.recompute,
        cp=p.cp,
    )


def check_layout(cfg: Config, world_size: int, world_source: str = "") -> Layout:
    """Raise one :class:`ConfigError` listing every problem of ``cfg`` on ``world_size`` ranks.

    Args:
        world_source: where the world size came from (the launcher variables read), added
            to a world-size problem so the user sees which launcher said what.

    Returns:
        The layout, with ``dp = world_size / (tp * pp * cp)``.
    """
    problems = []
    bad_world = world_problem(world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    if bad_world is not None:
        where = f" (world size from {world_source})" if world_source else ""
        problems.append(Problem(bad_world.rule, bad_world.message + where))
    layout = config_layout(cfg, world_size)
    problems += layout_problems(cfg.model, layout, cfg.training.global_batch)
    if problems:
        raise ConfigError("; ".join(p.message for p in problems))
    return layout
