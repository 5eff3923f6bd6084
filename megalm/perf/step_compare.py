"""The trainer's training step against a bare PyTorch loop on the same model, weights and batch.

The megalm path is the trainer's own step, :class:`megalm.train.strategy.PlainStep`
(``train_step``: DeepSpeed engine, gradient accumulation, clipping, the ZeRO-0 gradient
norm), on a world of one. The bare path is the textbook loop on a second copy of the
same model (the same seed gives the same weights). The two alternate (ABAB...) inside
one process so machine noise hits both alike; the result is the ratio of median step
times (megalm / bare). Both paths must produce the same losses, which shows they do the
same work.

``compiled=True`` adds a third path, the same trainer step with ``training.compile=true``
(every block and the loss through ``torch.compile``, :mod:`megalm.model.compile`), in the
same rotation; ``ratio_compiled_over_eager`` is its tokens/s over the eager trainer step's.
Compilation happens in the warm-up steps, which are not timed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from megalm.config import Config
from megalm.model import GPT
from megalm.parallel import ParallelContext, ParallelDims
from megalm.perf.flops import model_flops_per_token
from megalm.perf.measure import alternate, max_rel_diff, throughput
from megalm.train.dist import init_distributed
from megalm.train.engine import gradient_accumulation
from megalm.train.optim import make_optimizer, make_scheduler
from megalm.train.strategy import PlainStep


def bare_step(model, optimizer, scheduler, micro_batches, device, grad_clip: float) -> torch.Tensor:
    """The textbook loop: accumulate ``loss / accum``, clip, step, zero the grads."""
    losses = []
    for x, y in micro_batches:
        loss = model(x.to(device), y.to(device))
        (loss / len(micro_batches)).backward()
        losses.append(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean()


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """(the step's loss, its seconds); reading the loss waits for the device."""
    t0 = time.perf_counter()
    loss = fn().item()
    return loss, time.perf_counter() - t0


def _random_batches(cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step of micro-batches (tokens, labels), each (micro_batch, seq_len)."""
    m, t = cfg.model, cfg.training
    gen = torch.Generator().manual_seed(cfg.data.seed)
    windows = [
        torch.randint(0, m.vocab_size, (t.micro_batch, m.seq_len + 1), generator=gen)
        for _ in range(gradient_accumulation(cfg, 1))
    ]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def compare_step(cfg: Config, steps: int = 10, warmup: int = 3, compiled: bool = False) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of each path after ``warmup`` untimed ones (world of 1).

    Paths: ``megalm`` (the trainer's step, eager), ``bare``, and with ``compiled`` the trainer's
    step with ``training.compile=true``, alternating (:func:`megalm.perf.measure.alternate`).
    """
    info = init_distributed(cfg)
    if info.world_size != 1:
        raise ValueError("the step benchmark compares single-process steps; run it with plain python")
    device, t, m = info.device, cfg.training, cfg.model
    ctx = ParallelContext(ParallelDims.from_world(1))
    megalm = PlainStep(dataclasses.replace(cfg, training=dataclasses.replace(t, compile=False)), ctx, info)
    bare = GPT(m, init_seed=cfg.run.seed).to(device)
    bare_opt = make_optimizer(bare, cfg.optim, device)
    bare_sched = make_scheduler(bare_opt, cfg.optim, t.max_steps)
    batches = _random_batches(cfg)
    sides = {
        "megalm": lambda i: _timed(lambda: megalm.train_step(batches).loss),
        "bare": lambda i: _timed(
            lambda: bare_step(bare, bare_opt, bare_sched, batches, device, cfg.optim.grad_clip)
        ),
    }
    if compiled:
        step = PlainStep(dataclasses.replace(cfg, training=dataclasses.replace(t, compile=True)), ctx, info)
        sides["compiled"] = lambda i: _timed(lambda: step.train_step(batches).loss)
    losses, times = alternate(sides, steps, warmup)
    tokens = t.global_batch * m.seq_len
    speed = throughput(times, tokens, model_flops_per_token(m))
    med = speed["median_step_s"]
    out = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": {k: getattr(m, k) for k in ("family", "n_layers", "d_model", "seq_len", "vocab_size")},
        "global_batch": t.global_batch,
        "micro_batch": t.micro_batch,
        "zero_stage": cfg.zero.stage,
        "steps_timed": steps,
        "tokens_per_step": tokens,
        **speed,
        "ratio_megalm_over_bare": med["megalm"] / med["bare"],
        "max_loss_rel_diff": max_rel_diff(losses["megalm"], losses["bare"]),
        "losses": losses,
        "step_times_s": times,
    }
    if compiled:
        out["ratio_compiled_over_eager"] = med["megalm"] / med["compiled"]  # tokens/s compiled / eager
        out["max_loss_rel_diff_compiled"] = max_rel_diff(losses["compiled"], losses["megalm"])
    return out
