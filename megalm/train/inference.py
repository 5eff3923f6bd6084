"""A trained checkpoint, loaded the trainer's way for evaluation and generation.

``open_checkpoint`` follows the trainer's start-up order exactly (discover ranks ->
check the layout against the real world size -> open the run's data manifest ->
start the process group -> groups -> step strategy) and installs the weights
through the trainer's :class:`megalm.train.checkpoint.Checkpointer`, so whatever
launcher and layout (TP, PP, CP, DP, ZeRO) the trainer runs under, evaluation and
generation run under too, and they read whatever checkpoint format it writes.

The config is the run's own (saved in the checkpoint), plus command-line overrides
such as ``parallel.tp=2`` or ``model.kernels=torch``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml

from megalm.checkpoint.cli import resolve_tag
from megalm.checkpoint.manifest import CheckpointError
from megalm.config import Config, config_from_dict
from megalm.data import Manifest, load_manifest
from megalm.parallel import ParallelContext, ParallelDims
from megalm.parallel.layout import check_layout
from megalm.train.checkpoint import Checkpointer, read_meta
from megalm.train.dist import DistInfo, discover_ranks, init_distributed
from megalm.train.strategy import Strategy, build_strategy
from megalm.train.trainer import resolve_vocab


def checkpoint_config(tag: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run's config saved with ``tag`` (``meta.json``, else the run's ``config.yaml``), with
    ``overrides`` applied and ``training.resume`` pointing at ``tag``."""
    tree = read_meta(tag).get("config")
    if tree is None:
        run_config = tag.parent.parent / "config.yaml"
        if not run_config.is_file():
            raise CheckpointError(f"checkpoint '{tag}' holds no config and '{run_config}' is missing")
        tree = yaml.safe_load(run_config.read_text())
    cfg = config_from_dict(tree, overrides)
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, resume=str(tag)))


class _NoLoader:
    """Stands in for the training loader: inference restores no data position."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Loaded:
    """A checkpoint's model ready on this rank (every rank of the job holds one)."""

    cfg: Config
    tag: Path
    step: int
    manifest: Manifest
    info: DistInfo
    ctx: ParallelContext
    strategy: Strategy

    @property
    def rank0(self) -> bool:
        return self.info.rank == 0


def open_checkpoint(checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    """Collective: build the run's model under this job's launcher and layout and load ``checkpoint``.

    Raises:
        ConfigError: no checkpoint there (``CheckpointError``), a bad override or layout.
        DataError: the run's data manifest (tokenizer, EOS id) cannot be read.
    """
    tag = resolve_tag(checkpoint)
    cfg = checkpoint_config(tag, overrides)
    ranks = discover_ranks()
    layout = check_layout(cfg, ranks.world_size, ranks.world_from)
    dims = ParallelDims.from_world(ranks.world_size, layout.tp, layout.pp, layout.cp)
    manifest = load_manifest(cfg.data.dir, cfg.data)
    cfg = resolve_vocab(cfg, manifest)
    info = init_distributed(cfg, ranks)
    ctx = ParallelContext(dims, timedelta(seconds=cfg.dist.timeout_s))
    torch.manual_seed(cfg.run.seed)
    strategy = build_strategy(cfg, ctx, info)
    layout_meta = {"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "zero": cfg.zero.stage, "cp": dims.cp}
    step = Checkpointer(cfg, strategy.engine, _NoLoader(), layout_meta, ctx).resume()
    return Loaded(cfg, tag, step, manifest, info, ctx, strategy)
