"""The layout rules: which (model, tp, pp, dp, ZeRO, batch, world) combinations can be built.

One function, :func:`layout_problems`, returns every problem of a combination; the
trainer (:func:`check_layout`, before any process group exists), the planner
(``megalm/perf/plan.py``) and the benchmark sweep all call it, so they never disagree.
Ranges of single keys (``n_heads > 0``, ``dropout in [0, 1)``, intervals > 0) are the
config dataclasses' job (``megalm/config/schema.py``); the rules here combine keys.

Rules (each message names the values and the fix):

==================  =============================================================
rule                why
==================  =============================================================
world % (tp*pp)     the world is tp x pp x dp ranks (``ParallelDims``)
heads % tp          query heads are split over TP ranks (Megatron, Shoeybi 2019)
kv heads vs tp      K/V heads are split (n_kv >= tp) or replicated (n_kv < tp)
ffn % tp            the MLP width is split by column/row-parallel projections
seq % tp (SP)       sequence parallelism splits every sequence over TP ranks
pp <= layers        every pipeline stage needs a transformer block; stages may be
                    uneven (DeepSpeed balances ``type:SeededBlock``)
zero with pp        DeepSpeed's pipeline engine supports ZeRO-0/1 only
batch               ``global_batch = micro_batch x accumulation x dp``
lstm split          ``model.family=lstm`` runs with data parallelism and ZeRO only:
                    no tensor/pipeline split, no block recompute
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

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def short(self) -> str:
        sp = "+sp" if self.sp else ""
        return (
            f"tp={self.tp}{sp} pp={self.pp} dp={self.dp} zero={self.zero} mb={self.micro_batch} "
            f"recompute={self.recompute}"
        )


@dataclass(frozen=True)
class Problem:
    """A broken rule: ``rule`` is its short name (the planner groups by it), ``message`` the
    sentence a user reads (values and the fix)."""

    rule: str
    message: str


def world_problem(world_size: int, tp: int, pp: int) -> Problem | None:
    """The world must factor as ``tp x pp x dp``."""
    if world_size % (tp * pp) == 0:
        return None
    dp = max(1, world_size // (tp * pp))
    return Problem(
        "world % (tp*pp)",
        f"tp({tp}) * pp({pp}) * dp({dp}) != world_size({world_size}): the world size must be a "
        f"multiple of tp * pp = {tp * pp}",
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
    if lay.sp and m.seq_len % tp:
        out.append(
            Problem(
                "seq % tp",
                f"model.seq_len ({m.seq_len}) must be divisible by parallel.tp ({tp}) with "
                "parallel.sequence_parallel=true",
            )
        )
    if lay.pp > m.n_layers:
        out.append(
            Problem(
                "pp > layers",
                f"parallel.pp ({lay.pp}) is larger than model.n_layers ({m.n_layers}): every pipeline "
                "stage needs at least one transformer block",
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
        dp=max(1, world_size // (p.tp * p.pp)),
        zero=cfg.zero.stage,
        micro_batch=cfg.training.micro_batch,
        sp=p.sequence_parallel and p.tp > 1,
        recompute=cfg.training.recompute,
    )


def check_layout(cfg: Config, world_size: int, world_source: str = "") -> Layout:
    """Raise one :class:`ConfigError` listing every problem of ``cfg`` on ``world_size`` ranks.

    Args:
        world_source: where the world size came from (the launcher variables read), added
            to a world-size problem so the user sees which launcher said what.

    Returns:
        The layout, with ``dp = world_size / (tp * pp)``.
    """
    problems = []
    bad_world = world_problem(world_size, cfg.parallel.tp, cfg.parallel.pp)
    if bad_world is not None:
        where = f" (world size from {world_source})" if world_source else ""
        problems.append(Problem(bad_world.rule, bad_world.message + where))
    layout = config_layout(cfg, world_size)
    problems += layout_problems(cfg.model, layout, cfg.training.global_batch)
    if problems:
        raise ConfigError("; ".join(p.message for p in problems))
    return layout
