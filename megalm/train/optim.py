"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from megalm.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or norm gains (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019). On CUDA: apex ``FusedAdam`` when installed,
    else ``torch.optim.AdamW(fused=True)``; on CPU the ``foreach`` implementation."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # optional, present in NGC images

            return FusedAdam(groups, adam_w_mode=True, **kw)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, foreach=True, **kw)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier on ``cfg.lr`` for 0-based optimizer step ``step``.

    Linear warmup over ``warmup_steps`` (Goyal et al. 2017), then cosine decay to
    ``min_lr`` (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts):
    ``lr = min + (max - min) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction of
    the decay phase done; ``min_lr`` afterwards.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or max_steps
    if step >= decay_steps:
        return cfg.min_lr / cfg.lr
    t = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return (cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t))) / cfg.lr


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """``LambdaLR`` over :func:`lr_multiplier`; DeepSpeed steps and checkpoints it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg, max_steps))


def apply_configured_lr(scheduler, cfg: OptimConfig) -> None:
    """After loading a checkpoint: ``optim.lr`` as configured now wins over the base LR saved
    with the scheduler, so "lower optim.lr, then resume" does what it says. The schedule's
    position (``last_epoch``, the optimizer step count) stays the checkpoint's."""
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
