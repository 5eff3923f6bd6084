"""The DeepSpeed edge: config generation and ``deepspeed.initialize``.

Data parallelism, ZeRO, precision, gradient accumulation and clipping are the
engine's job; megalm only describes them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megalm.config import Config, ConfigError
from megalm.perf.flops import param_count
from megalm.train.optim import make_optimizer, make_scheduler


def resolve_dtype(cfg: Config, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU."""
    if cfg.precision.dtype != "auto":
        return cfg.precision.dtype
    return "bf16" if device.type == "cuda" else "fp32"


def check_precision(cfg: Config) -> None:
    """Refuse a ``precision.dtype`` DeepSpeed cannot run on this machine's device (fp16 on
    CPU: its sanity check would raise deep inside ``deepspeed.initialize``).

    Raises:
        ConfigError: naming the dtype, the device and what to use instead.
    """
    dtype = cfg.precision.dtype
    if dtype not in ("fp16", "bf16"):
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not (acc.is_fp16_supported() if dtype == "fp16" else acc.is_bf16_supported()):
        other = "bf16 or fp32" if dtype == "fp16" and acc.is_bf16_supported() else "fp32"
        raise ConfigError(
            f"precision.dtype={dtype} is not supported by DeepSpeed on this machine's "
            f"{acc.device_name()} device; use precision.dtype={other} here, or run on a CUDA GPU"
        )


def gradient_accumulation(cfg: Config, dp: int) -> int:
    """``global_batch / (micro_batch * dp)`` of a layout that passed
    :func:`megalm.parallel.layout.check_layout` (which owns the divisibility rule)."""
    t = cfg.training
    return t.global_batch // (t.micro_batch * dp)


def zero_bucket_elements(n_params: int) -> int:
    """ZeRO reduce/all-gather bucket size in elements: DeepSpeed's default 5e8 (2 GB of fp32
    per rank, however small the model), capped at the model size (at least 2^20)."""
    return int(min(5e8, max(2**20, n_params)))


def deepspeed_config(cfg: Config, dp: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent of ``cfg`` for ``dp`` data-parallel ranks."""
    dtype = resolve_dtype(cfg, device)
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    if cfg.zero.stage == 3:
        # Gather parameters on every forward: keeps memory predictable for small models
        # and makes eval/generation identical across ranks.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if cfg.zero.stage >= 1 and cfg.model.vocab_size:
        bucket = zero_bucket_elements(param_count(cfg.model))
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return {
        # DeepSpeed's "data parallel" is dp x cp (ParallelContext.as_mpu): each cp rank counts as
        # a rank reading global_batch / dp sequences' worth of its own tokens.
        "train_batch_size": cfg.training.global_batch * cfg.parallel.cp,
        "train_micro_batch_size_per_gpu": cfg.training.micro_batch,
        "gradient_accumulation_steps": gradient_accumulation(cfg, dp),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # DeepSpeed's pipeline sends 1/tp of each activation per TP rank and all-gathers it at
        # the receiver, assuming TP peers hold identical activations. With sequence
        # parallelism each peer holds a different sequence slice, so send whole tensors.
        "pipeline": {
            "pipe_partitioned": not cfg.parallel.sequence_parallel,
            "grad_partitioned": not cfg.parallel.sequence_parallel,
        },
        "steps_per_print": 2**31 - 1,  # megalm logs its own metrics
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: Config, model: nn.Module, dp: int, device: torch.device, mpu=None):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warmup-cosine schedule.

    ``mpu``: :meth:`megalm.parallel.ParallelContext.as_mpu`, so DeepSpeed averages
    gradients over the data-parallel (dp x cp) group only and counts TP shards once in
    the gradient norm.

    Returns:
        The ``DeepSpeedEngine`` (``engine(tokens, labels)`` gives the loss,
        ``engine.backward``/``engine.step`` run one micro-step).
    """
    import deepspeed

    model.to(device)
    optimizer = make_optimizer(model, cfg.optim, device)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.training.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=mpu,
        config=deepspeed_config(cfg, dp, device),
    )
    return engine
