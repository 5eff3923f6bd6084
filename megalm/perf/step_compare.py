"""megalm's training step against a bare PyTorch loop on the same model, weights and batch.

The two paths alternate (ABAB...) inside one process so machine noise hits both
alike; the result is the ratio of median step times (megalm / bare). Both paths
must also produce the same losses, which shows they do the same work.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from megalm.config import Config
from megalm.model import GPT
from megalm.perf.flops import model_flops_per_token
from megalm.train.dist import init_distributed
from megalm.train.engine import build_engine, gradient_accumulation
from megalm.train.optim import make_optimizer, make_scheduler
from megalm.train.step import engine_step


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


def _timed(fn) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compare_step(cfg: Config, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of each path after ``warmup`` untimed ones (world of 1)."""
    info = init_distributed(cfg)
    if info.world_size != 1:
        raise ValueError("the step benchmark compares single-process steps; run it with plain python")
    device, t, m = info.device, cfg.training, cfg.model
    torch.manual_seed(cfg.run.seed)
    model = GPT(m)
    bare = copy.deepcopy(model).to(device)
    engine = build_engine(cfg, model, 1, device)
    bare_opt = make_optimizer(bare, cfg.optim, device)
    bare_sched = make_scheduler(bare_opt, cfg.optim, t.max_steps)
    gen = torch.Generator().manual_seed(cfg.data.seed)
    accum = gradient_accumulation(cfg, 1)
    batches = [
        (w[:, :-1], w[:, 1:])
        for w in (
            torch.randint(0, m.vocab_size, (t.micro_batch, m.seq_len + 1), generator=gen)
            for _ in range(accum)
        )
    ]
    times: dict[str, list[float]] = {"megalm": [], "bare": []}
    losses: dict[str, list[float]] = {"megalm": [], "bare": []}
    runs = {
        "megalm": lambda: engine_step(engine, batches, device, measure_grad_norm=False)[0],
        "bare": lambda: bare_step(bare, bare_opt, bare_sched, batches, device, cfg.optim.grad_clip),
    }
    for i in range(warmup + steps):
        order = ("megalm", "bare") if i % 2 == 0 else ("bare", "megalm")
        for name in order:
            loss, seconds = _timed(runs[name])
            losses[name].append(loss.item())
            if i >= warmup:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = t.global_batch * m.seq_len
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": {
            "family": m.family,
            "n_layers": m.n_layers,
            "d_model": m.d_model,
            "seq_len": m.seq_len,
            "vocab_size": m.vocab_size,
        },
        "global_batch": t.global_batch,
        "micro_batch": t.micro_batch,
        "zero_stage": cfg.zero.stage,
        "steps_timed": steps,
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "tflops": {k: tokens * model_flops_per_token(m) / v / 1e12 for k, v in med.items()},
        "ratio_megalm_over_bare": med["megalm"] / med["bare"],
        "max_loss_rel_diff": max(
            abs(a - b) / abs(b) for a, b in zip(losses["megalm"], losses["bare"], strict=True)
        ),
        "losses": losses,
        "step_times_s": times,
    }
