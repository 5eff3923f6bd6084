"""How long a save blocks the training loop: asynchronous vs synchronous, same state, one process.

Both modes save the same trained state through the same :class:`Checkpointer`, alternating
(sync, async, sync, ...) so machine noise hits both. ``blocked`` is the time ``save()``
holds the training thread; for async saves ``published`` adds the background write until
the tag is ``COMPLETE`` (waited for outside the blocked time, as the next save would).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from megalm.checkpoint.manifest import tag_bytes
from megalm.config import Config
from megalm.train.checkpoint import tag_for


def measure_saves(cfg: Config, repeats: int = 3) -> dict[str, Any]:
    """Train one step, then time ``repeats`` synchronous and asynchronous saves of that state."""
    from megalm.train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.strategy.train_step(trainer.batches.step_batches())
    ckpt = trainer.checkpointer
    times: dict[str, list[float]] = {"sync_blocked": [], "async_blocked": [], "async_published": []}
    step = 1000
    for _ in range(repeats):
        step += 1
        times["sync_blocked"].append(ckpt.save(step, wait=True))
        step += 1
        t0 = time.perf_counter()
        times["async_blocked"].append(ckpt.save(step, wait=False))
        ckpt.finish()
        times["async_published"].append(time.perf_counter() - t0)
    sync, block = statistics.median(times["sync_blocked"]), statistics.median(times["async_blocked"])
    m = trainer.cfg.model
    return {
        "model": f"{m.family} L={m.n_layers} d={m.d_model} V={m.vocab_size}",
        "params": sum(p.numel() for p in trainer.engine.module.parameters()),
        "tag_bytes": sum(tag_bytes(Path(cfg.run.dir) / "checkpoints" / tag_for(step)).values()),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "seconds": times,
        "median_s": {
            "sync_blocked": sync,
            "async_blocked": block,
            "async_published": statistics.median(times["async_published"]),
        },
        "ratio_async_over_sync": block / sync,
    }
