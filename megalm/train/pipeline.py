"""The model as a DeepSpeed pipeline: the same components as :class:`megalm.model.GPT`.

Layers (Huang et al. 2019 GPipe; executed by DeepSpeed's 1F1B pipeline engine,
Narayanan et al. 2019 PipeDream-Flush)::

    Embedding | SeededBlock x L | FinalNorm | Head            (llama, untied)
    Embedding | SeededBlock x L | FinalNorm | Embedding.logits (gpt2, tied via TiedLayerSpec)

Every component initializes itself from its own seed, so a stage that builds only
blocks 4..7 gets the weights the whole model has, and pp=N starts from the pp=1
weights. The topology handed to DeepSpeed comes from megalm's grid: axes
``pipe, data, model`` with ``model`` (= tp) fastest and ``data`` covering cp x dp
(``cp_rank + cp * dp_rank``), the same rank meaning as
:class:`megalm.parallel.ParallelDims`; DeepSpeed's data-parallel reduction therefore
spans dp x cp, as the plain engine's (``ParallelContext.as_mpu``).

Known limits: dropout masks under pp > 1 differ from pp = 1 (each stage draws from
its own process's RNG stream); sampling text from a pipelined model is not
implemented (the trainer skips it and says so).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from megalm.config import Config
from megalm.model.gpt import (
    Embedding,
    FinalNorm,
    Head,
    LMLoss,
    SeededBlock,
    component_seed,
    require_vocab,
)
from megalm.parallel import ParallelContext
from megalm.train.engine import build_engine, resolve_dtype
from megalm.train.step import grad_norm


def _tied_logits(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return embedding.logits(x)


def build_pipeline(cfg: Config, ctx: ParallelContext, init_seed: int):
    """A ``deepspeed.pipe.PipelineModule`` holding this rank's stage.

    Partitioning (``parallel.pp_partition``): ``uniform`` balances transformer blocks
    (DeepSpeed ``type:SeededBlock``), ``parameters`` balances parameter counts.
    Activation checkpointing every ``training.recompute_interval`` layers when
    ``training.recompute`` is ``full``.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    m, p, t = cfg.model, cfg.parallel, cfg.training
    require_vocab(m)
    group, sp, L, cp_group = ctx.tp_group, p.sequence_parallel, m.n_layers, ctx.cp_group
    embed_args = (m, group, sp, component_seed(init_seed, 0), cp_group)
    tied = m.tied
    layers = [
        TiedLayerSpec("embed", Embedding, *embed_args, tied_weight_attr="tok_emb.weight")
        if tied
        else LayerSpec(Embedding, *embed_args)
    ]
    layers += [
        LayerSpec(SeededBlock, m, group, sp, component_seed(init_seed, 1 + i), cp_group) for i in range(L)
    ]
    layers.append(LayerSpec(FinalNorm, m, group, sp))
    if tied:
        layers.append(
            TiedLayerSpec(
                "embed", Embedding, *embed_args, forward_fn=_tied_logits, tied_weight_attr="tok_emb.weight"
            )
        )
    else:
        layers.append(LayerSpec(Head, m, group, component_seed(init_seed, L + 1)))
    topology = PipeModelDataParallelTopology(num_pp=p.pp, num_mp=p.tp, num_dp=ctx.dp_cp)
    module = PipelineModule(
        layers=layers,
        topology=topology,
        loss_fn=LMLoss(m, group),
        partition_method="type:SeededBlock" if p.pp_partition == "uniform" else "parameters",
        activation_checkpoint_interval=t.recompute_interval if t.recompute == "full" else 0,
        activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
    )
    mark_for_grad_norm(module, ctx)
    return module


def mark_for_grad_norm(module: torch.nn.Module, ctx: ParallelContext) -> None:
    """Make DeepSpeed's gradient norm count every parameter exactly once under PP.

    DeepSpeed counts a parameter if it is model-parallel or if this rank is rank 0
    of the (pipe x tensor) model-parallel group, which would skip the replicated
    parameters of every stage but the first. Mark each stage's TP-replicated
    parameters as model-parallel on its TP rank 0, and never count the last
    stage's copy of a tied embedding (``ds_pipe_replicated``).
    """
    for param in module.parameters():
        if getattr(param, "ds_pipe_replicated", False):
            param.tensor_model_parallel = False
            param.model_parallel = False
        elif not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = ctx.tp_rank == 0


class MeasuredClipping:
    """Gradient norm and clipping of a ZeRO-0 fp32 pipeline, done where DeepSpeed would do them.

    DeepSpeed's pipeline engine clips ZeRO-0 fp32 gradients inside ``train_batch`` and
    drops the norm (only its fp16/bf16/ZeRO optimizers keep one). So for this engine
    DeepSpeed's clipping is off and this optimizer step pre-hook does both: it runs after
    the schedule's ``ReduceTiedGrads`` and ``ReduceGrads`` (the gradients are the
    data-parallel means, tied copies summed) and before the update. The norm is
    :func:`megalm.train.step.grad_norm`, the plain path's, over this stage's parameters
    with the pipe x tensor model-parallel group (:func:`mark_for_grad_norm` makes each
    parameter count once); clipping scales by ``min(1, max_norm / (norm + 1e-6))``,
    DeepSpeed's ``clip_grad_norm_`` formula (``torch.nn.utils.clip_grads_with_norm_``).
    """

    def __init__(self, params: list[torch.nn.Parameter], ctx: ParallelContext, max_norm: float) -> None:
        self.params, self.mpu, self.max_norm = params, ctx.as_mpu(), max_norm
        self.norm: torch.Tensor | None = None  # 0-d fp32, the last step's norm before clipping

    def __call__(self, optimizer, args, kwargs) -> None:
        self.norm = grad_norm(self.params, self.mpu)
        if self.max_norm > 0:
            grads = [p for p in self.params if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(grads, self.max_norm, self.norm.to(grads[0].grad.device))


def build_pipeline_engine(cfg: Config, module, ctx: ParallelContext, device: torch.device):
    """The DeepSpeed pipeline engine for ``module``, and the :class:`MeasuredClipping` hook
    on its optimizer when DeepSpeed would not keep the gradient norm (ZeRO-0, fp32).

    Returns:
        ``(engine, clipping or None)``.
    """
    if cfg.zero.stage != 0 or resolve_dtype(cfg, device) != "fp32":
        return build_engine(cfg, module, ctx.dp, device), None
    unclipped = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_clip=0.0))
    engine = build_engine(unclipped, module, ctx.dp, device)
    clipping = MeasuredClipping(list(module.parameters()), ctx, cfg.optim.grad_clip)
    engine.optimizer.register_step_pre_hook(clipping)
    return engine, clipping


def pipeline_grad_norm(engine, clipping: MeasuredClipping | None) -> torch.Tensor | None:
    """The last step's global gradient norm before clipping (0-d fp32), ``None`` if unknown."""
    if clipping is not None:
        return clipping.norm
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)


def describe_partition(module, ctx: ParallelContext) -> list[str]:
    """One line per stage: its layer range and parameter count (collective; rank 0 gets all)."""
    mine = (ctx.pp_rank, module._local_start, module._local_stop, sum(p.numel() for p in module.parameters()))
    stages = [None] * dist.get_world_size()
    first = ctx.tp_rank == 0 and ctx.dp_rank == 0 and ctx.cp_rank == 0
    dist.all_gather_object(stages, mine if first else None)
    return [
        f"stage {s}: layers [{a}, {b}) of {len(module._layer_specs)}, {n / 1e6:.3f}M parameters per TP rank"
        for s, a, b, n in sorted(x for x in stages if x is not None)
    ]


def pipeline_train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One optimizer step over ``accum`` micro-batches (1F1B); the data-parallel mean loss."""
    return float(engine.train_batch(data_iter=iter(micro_batches)))


def pipeline_eval_loss(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], accum: int) -> float:
    """Mean loss over micro-batches, ``accum`` per pipeline flush (every rank gets it)."""
    losses = [
        float(engine.eval_batch(iter(micro_batches[i : i + accum])))
        for i in range(0, len(micro_batches), accum)
    ]
    return sum(losses) / len(losses)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B/GPipe schedule: ``(p - 1) / (m + p - 1)``
    (Narayanan et al. 2021, section 2.2.1)."""
    return (pp - 1) / (micro_batches + pp - 1)
