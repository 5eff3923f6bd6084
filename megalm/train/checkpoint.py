"""Checkpoints that an interrupted save can never make unloadable.

Layout under ``<run.dir>/checkpoints/``::

    step_00000100/          DeepSpeed model/optimizer/scheduler shards (every rank)
        rng/rank_00000.pt   per-rank torch / numpy / python RNG states
        meta.json           step, loader state, resolved config (rank 0)
        COMPLETE            written last, after a barrier: the tag is whole
    latest                  name of the newest COMPLETE tag, replaced atomically

A save writes the tag, waits for every rank, marks it ``COMPLETE`` and only then
points ``latest`` at it (``os.replace`` of a temporary file). A crash at any
moment leaves ``latest`` naming a whole checkpoint. Resume picks ``latest`` and,
if it is missing or broken, the newest ``COMPLETE`` tag.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalm.config import Config, ConfigError, to_dict

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a ``COMPLETE`` marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.glob("step_*") if (p / COMPLETE).is_file())


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``training.resume=auto`` continues from, or ``None``."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return ckpt_dir / tag
    tags = complete_tags(ckpt_dir)
    return ckpt_dir / tags[-1] if tags else None


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    rank = dist.get_rank()
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a partial save of this step from an interrupted run
            shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"megalm": meta}, save_latest=False)
    (path / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        atomic_write_text(path / COMPLETE, "")
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return path


def check_layout(path: Path, saved: dict[str, int] | None, current: dict[str, int]) -> None:
    """Refuse a resume DeepSpeed cannot do, before it fails deep inside.

    Model shards are per TP (and PP) rank, and ZeRO >= 1 partitions optimizer states
    over data-parallel ranks, so those must match; plain data parallelism (ZeRO-0)
    may change its size freely.
    """
    if saved is None:
        return
    keys = ["tp", "pp", "zero"] + (["dp"] if current["zero"] >= 1 or saved.get("zero", 0) >= 1 else [])
    if any(saved.get(k) != current[k] for k in keys):

        def fmt(d: dict) -> str:
            return " ".join(f"{k}={d.get(k)}" for k in ("tp", "pp", "dp", "zero"))

        raise LayoutMismatchError(
            f"checkpoint '{path}' was saved with {fmt(saved)} but this run has {fmt(current)}; resume "
            f"with the same {', '.join(keys)} or start fresh with training.resume=never"
        )


class LayoutMismatchError(ConfigError):
    """A checkpoint written under another parallel layout."""


def load_checkpoint(engine, path: Path, layout: dict[str, int] | None = None) -> dict[str, Any]:
    """Collective: restore engine, RNG; return the megalm metadata saved with it.

    ``layout``: this run's ``{tp, pp, dp, zero}``, checked against the saved one first.
    """
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"checkpoint '{path}' is incomplete or missing (no {COMPLETE} marker); "
            "pass another training.resume path or training.resume=never"
        )
    if layout is not None and (path / "meta.json").is_file():
        check_layout(path, json.loads((path / "meta.json").read_text()).get("layout"), layout)
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint '{path}'")
    rank_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rank_file.is_file():  # absent when resuming on more ranks than saved
        set_rng_state(torch.load(rank_file, weights_only=False))
    return client["megalm"]


class Checkpointer:
    """What a checkpoint holds and when one is written (torchtitan's ``checkpointer.save(step,
    last_step=...)`` shape): the engine's states, the loader position, the layout and config.

    Args:
        cfg: the resolved config (saved with every tag; ``training.*`` gives the policy).
        engine: the DeepSpeed engine.
        batches: the training loader (``state_dict``/``load_state_dict``: exact position).
        layout: ``{tp, pp, dp, zero}`` of this run.
    """

    def __init__(self, cfg: Config, engine, batches, layout: dict[str, int]) -> None:
        self.cfg, self.engine, self.batches, self.layout = cfg, engine, batches, layout
        self.dir = Path(cfg.run.dir) / "checkpoints"
        self.extra: dict[str, Any] = {}  # more metadata saved with every tag (e.g. health counters)
        self.meta: dict[str, Any] = {}  # the metadata of the tag last loaded

    def resume(self) -> int:
        """Restore per ``training.resume`` (``auto``, ``never`` or a tag path); returns the step."""
        how = self.cfg.training.resume
        if how == "never":
            return 0
        if how == "auto":
            return self.load_latest() or 0
        return self._load(Path(how))

    def load_latest(self) -> int | None:
        """Collective: restore the newest complete tag (``resume=auto``, and a health rollback);
        returns its step, ``None`` when there is none."""
        path = find_latest(self.dir)
        return None if path is None else self._load(path)

    def latest_tag(self) -> str | None:
        """The name of the tag :meth:`load_latest` would restore, or ``None``."""
        path = find_latest(self.dir)
        return None if path is None else path.name

    def _load(self, path: Path) -> int:
        meta = load_checkpoint(self.engine, path, self.layout)
        self.batches.load_state_dict(meta["data"])
        self.meta = meta
        if dist.get_rank() == 0:
            print(f"resumed from {path} at step {meta['step']}", flush=True)
        return int(meta["step"])

    def due(self, step: int, last_step: bool = False) -> bool:
        """A save is due every ``training.save_interval`` steps and at the last step."""
        return last_step or step % self.cfg.training.save_interval == 0

    def maybe_save(self, step: int, last_step: bool = False) -> None:
        """Collective: save ``step`` if :meth:`due`."""
        if self.due(step, last_step):
            self.save(step)

    def save(self, step: int) -> None:
        """Collective: write tag ``step`` (whole or invisible, see the module docstring)."""
        meta = {
            "step": step,
            "data": self.batches.state_dict(),
            "world_size": dist.get_world_size(),
            "layout": self.layout,
            "config": to_dict(self.cfg),
            **self.extra,
        }
        t0 = time.perf_counter()
        path = save_checkpoint(self.engine, self.dir, step, meta, self.cfg.training.keep_checkpoints)
        if dist.get_rank() == 0:
            print(f"saved {path} in {time.perf_counter() - t0:.1f}s", flush=True)
