"""Checkpoints that load onto any layout, verify before use and never block on the disk.

Layout under ``<run.dir>/checkpoints/`` (format: ``docs/checkpoints.md``)::

    step_00000100/
        model_tp00_pp00_dp000.safetensors   fp32 weights: pieces of global (tp = 1) tensors
        optim_tp00_pp00_dp000.safetensors   AdamW moments, the same pieces
        rng/rank_00000.pt                   each rank's torch / numpy / python RNG state
        meta.json                           step, AdamW step, LR schedule, loader, layout, config
        manifest.json                       size + sha256 of every file above
        COMPLETE                            the tag is whole and verified
    latest                                  name of the newest COMPLETE tag, replaced atomically

Saving gathers this rank's pieces into host memory (a collective over each data-parallel
group, through :mod:`megalm.train.engine_state`), then writes them in the foreground or,
with ``training.async_save``, in a background thread while training goes on
(:mod:`megalm.checkpoint.writer`). Resuming verifies the tag (every file against the
manifest, split over the ranks), checks the model shape, and reads for each local
parameter just the box of the global tensor it holds, at whatever layout this run has.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalm.checkpoint.manifest import COMPLETE, CheckpointError, verify_tag
from megalm.checkpoint.tensors import MODEL, MOMENTS, OPTIM, TensorIndex, pieces_bytes, shard_file
from megalm.checkpoint.writer import LATEST, BackgroundSave, complete_tags, publish, tag_for, write_rank_files
from megalm.config import Config, to_dict
from megalm.parallel import ParallelContext
from megalm.train.engine_state import (
    LocalParam,
    assign_writers,
    engine_counters,
    gather_pieces,
    local_params,
    optimizer_step,
    prepare_optimizer_state,
    set_engine_counters,
    set_optimizer_step,
    write_full,
)
from megalm.train.model_shape import shape_problem

__all__ = ["Checkpointer", "CheckpointError", "find_latest", "tag_for"]


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest ``COMPLETE`` tag (``latest`` first), or ``None``; not yet verified."""
    candidates = resume_candidates(ckpt_dir)
    return candidates[0] if candidates else None


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """``COMPLETE`` tags, the one ``latest`` names first, then newest to oldest."""
    tags = complete_tags(ckpt_dir)[::-1]
    latest = ckpt_dir / LATEST
    named = latest.read_text().strip() if latest.is_file() else ""
    if named in tags:
        tags.remove(named)
        tags.insert(0, named)
    return [ckpt_dir / t for t in tags]


def rng_bytes() -> bytes:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_meta(tag_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((tag_dir / "meta.json").read_text())
        int(meta["step"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"'{tag_dir / 'meta.json'}' is unreadable ({type(e).__name__}: {e})") from None


def _agreed_problem(mine: str | None) -> str | None:
    """Collective: the first problem any rank found (the same answer on every rank)."""
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    return next((p for p in found if p is not None), None)


class Checkpointer:
    """What a checkpoint holds and when one is written (torchtitan's ``checkpointer.save(step,
    last_step=...)`` shape): the engine's states, the loader position, the layout and config.

    Args:
        cfg: the resolved config (``training.*`` gives the policy).
        engine: the DeepSpeed engine (plain or pipeline).
        batches: the training loader (``state_dict``/``load_state_dict``: exact position).
        layout: ``{tp, pp, dp, zero, cp}`` of this run.
        ctx: the process groups (tensor/pipeline/data-parallel ranks of this process). The
            ranks that hold the same shard are the dp x cp ranks (context-parallel ranks hold
            the same weights), so those share the writing of each (tp, pp) cell's pieces.
    """

    def __init__(self, cfg: Config, engine, batches, layout: dict[str, int], ctx: ParallelContext) -> None:
        self.cfg, self.engine, self.batches, self.layout, self.ctx = cfg, engine, batches, layout, ctx
        self.dir = Path(cfg.run.dir) / "checkpoints"
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params = local_params(engine.module, ctx.tp_rank, cfg.model.n_layers, cfg.parallel.pp > 1)
        self.writers = assign_writers(self.params, ctx.dp_cp)
        self.pending: BackgroundSave | None = None
        self.staging: dict[str, torch.Tensor] = {}  # host copies of the state, reused by every save
        self.extra: dict[str, Any] = {}  # more metadata saved with every tag (e.g. health counters)
        self.meta: dict[str, Any] = {}  # the metadata of the tag last loaded

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    # ---- resume -------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore per ``training.resume`` (``auto``, ``never`` or a tag path); returns the step.

        ``auto`` takes the newest tag that verifies, saying which newer ones it skipped and why
        (``training.resume_fallback=false``: a tag that does not verify is an error).
        """
        t = self.cfg.training
        if t.resume == "never":
            return 0
        if t.resume != "auto":
            path = Path(t.resume)
            problem = _agreed_problem(self._check(path))
            if problem is not None:
                raise CheckpointError(
                    f"{problem}; pass another tag with training.resume=PATH, or training.resume=auto "
                    "to resume from the newest tag that verifies"
                )
            return self._load(path)
        return self.load_latest() or 0

    def load_latest(self) -> int | None:
        """Collective: restore the newest tag that verifies (``resume=auto``, and a health
        rollback), saying which newer ones it skipped and why; ``None`` when there is none."""
        candidates = resume_candidates(self.dir)
        for i, path in enumerate(candidates):
            problem = _agreed_problem(self._check(path))
            if problem is None:
                return self._load(path)
            if not self.cfg.training.resume_fallback:
                raise CheckpointError(
                    f"{problem}; training.resume_fallback=false: restore or remove {path.name}, or set "
                    "training.resume_fallback=true to resume from the newest tag that verifies"
                )
            then = f"resuming from {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older tag"
            self._log(f"checkpoint | skipped {path.name}: {problem}; {then}")
        if candidates:
            raise CheckpointError(
                f"no checkpoint in '{self.dir}' verifies (see the skipped tags above); restore their "
                "files or start fresh with training.resume=never"
            )
        return None

    def latest_tag(self) -> str | None:
        """The name of the newest complete tag (what :meth:`load_latest` tries first), or ``None``."""
        path = find_latest(self.dir)
        return None if path is None else path.name

    def _check(self, path: Path) -> str | None:
        """This rank's share of the verification of tag ``path`` (``None``: fine so far)."""
        if not (path / COMPLETE).is_file():
            return f"checkpoint '{path}' is incomplete or missing (no {COMPLETE} marker)"
        problem = verify_tag(path, self.rank, self.world)
        if problem is None:
            try:
                read_meta(path)
            except CheckpointError as e:
                problem = str(e)
        return problem

    def _load(self, path: Path) -> int:
        """Collective: install tag ``path`` (verified) into the engine, loader and RNG."""
        meta = read_meta(path)
        model = TensorIndex(path, MODEL)
        optim = TensorIndex(path, OPTIM)
        problem = shape_problem(path, meta, model, self.cfg)
        if problem is not None:
            raise CheckpointError(problem)
        prepare_optimizer_state(self.engine)
        device = next(iter(self.engine.module.parameters())).device
        for lp in self.params:
            self._install(lp, model, optim, device)
        model.close()
        optim.close()
        self._restore_schedule(meta)
        if meta.get("data") is not None:
            self.batches.load_state_dict(meta["data"])
        self._restore_rng(path, meta)
        self.meta = meta
        self._log(f"resumed from {path} at step {meta['step']}")
        return int(meta["step"])

    def _install(self, lp: LocalParam, model: TensorIndex, optim: TensorIndex, device: torch.device) -> None:
        local = [hi - lo for lo, hi in lp.box]
        write_full(self.engine, lp.param, None, model.read(lp.name, lp.box).reshape(local).to(device))
        for moment in MOMENTS:
            key = f"{moment}/{lp.name}"
            if key in optim:  # an imported (HF) tag has weights only: AdamW starts afresh
                write_full(self.engine, lp.param, moment, optim.read(key, lp.box).reshape(local).to(device))

    def _restore_schedule(self, meta: dict[str, Any]) -> None:
        set_optimizer_step(self.engine, int(meta.get("optimizer_step", 0)))
        scheduler = self.engine.lr_scheduler
        if meta.get("scheduler") is not None and scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        set_engine_counters(self.engine, meta.get("engine", {}))

    def _restore_rng(self, path: Path, meta: dict[str, Any]) -> None:
        """Same layout: each rank continues its own streams. Another layout: every rank takes
        saved rank 0's (dropout masks are drawn identically on every rank of a pp = 1 run)."""
        same = meta.get("layout") == self.layout
        rank_file = path / "rng" / f"rank_{self.rank if same else 0:05d}.pt"
        if rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=False))

    # ---- save ---------------------------------------------------------------------------

    def due(self, step: int, last_step: bool = False) -> bool:
        """A save is due every ``training.save_interval`` steps and at the last step."""
        return last_step or step % self.cfg.training.save_interval == 0

    def maybe_save(self, step: int, last_step: bool = False) -> None:
        """Collective: save ``step`` if :meth:`due`; the last step's save is waited for."""
        if self.due(step, last_step):
            self.save(step, wait=last_step or not self.cfg.training.async_save)

    def save(self, step: int, wait: bool = True) -> float:
        """Collective: write tag ``step`` (whole or invisible, see the module docstring).

        ``wait=False`` returns once the state is in host memory; the files are written and
        the tag published by a background thread. Returns the seconds the caller was blocked.
        """
        t0 = time.perf_counter()
        self.finish()
        tag_dir = self.dir / tag_for(step)
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a partial save of this step from an interrupted run
                shutil.rmtree(tag_dir)
        dist.barrier()
        files = self._files(step)
        t = self.cfg.training
        keep, timeout = t.keep_checkpoints, t.save_timeout_s

        def work() -> None:
            write_rank_files(tag_dir, self.rank, files)
            if self.rank == 0:
                publish(tag_dir, self.world, keep, timeout)

        if wait:
            write_rank_files(tag_dir, self.rank, files)
            dist.barrier()
            if self.rank == 0:
                publish(tag_dir, self.world, keep, timeout)
            dist.barrier()
            self._log(f"saved {tag_dir} in {time.perf_counter() - t0:.2f}s")
        else:
            self.pending = BackgroundSave(tag_dir.name, work)
            self._log(
                f"saving {tag_dir} in the background ({time.perf_counter() - t0:.2f}s to copy the state)"
            )
        return time.perf_counter() - t0

    def finish(self) -> None:
        """Wait for a background save still in flight (bounded by ``training.save_timeout_s``)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            waited = pending.wait(self.cfg.training.save_timeout_s)
            self._log(f"saved {self.dir / pending.tag} in the background (waited {waited:.2f}s for it)")

    def _files(self, step: int) -> dict[str, Any]:
        """Collective: this rank's files of tag ``step``, as bytes producers over host copies."""
        c = self.ctx
        prepare_optimizer_state(self.engine)  # DeepSpeed's views of the moments, for every group
        model, optim = gather_pieces(self.engine, self.params, self.writers, c.dp_cp_rank, self.staging)
        rng = rng_bytes()
        files: dict[str, Any] = {f"rng/rank_{self.rank:05d}.pt": lambda: rng}
        for kind, pieces in ((MODEL, model), (OPTIM, optim)):
            if pieces:
                files[shard_file(kind, c.tp_rank, c.pp_rank, c.dp_cp_rank)] = lambda p=pieces: pieces_bytes(p)
        if self.rank == 0:
            text = json.dumps(self._meta(step), indent=1, default=str).encode()
            files["meta.json"] = lambda: text
        return files

    def _meta(self, step: int) -> dict[str, Any]:
        m, t = self.cfg.model, self.cfg.training
        scheduler = self.engine.lr_scheduler
        return {
            "step": step,
            "tokens": step * t.global_batch * m.seq_len,
            "optimizer_step": optimizer_step(self.engine),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "engine": engine_counters(self.engine),
            "data": self.batches.state_dict(),
            "world_size": self.world,
            "layout": self.layout,
            "config": to_dict(self.cfg),
            **self.extra,
        }
