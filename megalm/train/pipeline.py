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

With ``data.document_mask`` the layers pass (hidden, position_ids, doc_ids) from stage
to stage (``Doc*`` layers). Text is sampled from the stages by
:class:`megalm.train.generation.PipelineLM`.

Known limits: dropout masks under pp > 1 differ from pp = 1 (each stage draws from
its own process's RNG stream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

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
from megalm.train.step import PhaseTimer, grad_norm


def _tied_logits(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    return embedding.logits(x)


# With data.document_mask every stage passes (hidden, position_ids, doc_ids) on: DeepSpeed sends
# tuples between stages and carries gradients for the floating-point first element only.
class DocEmbedding(Embedding):
    """:class:`Embedding` on (tokens, position_ids, doc_ids) -> (x, position_ids, doc_ids)."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, pos, doc = inputs
        return super().forward(tokens, pos), pos, doc


class DocSeededBlock(SeededBlock):
    """:class:`SeededBlock` on (x, position_ids, doc_ids) -> the same triple."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, pos, doc = inputs
        return super().forward(x, pos, doc), pos, doc


class DocFinalNorm(FinalNorm):
    """:class:`FinalNorm` on (x, position_ids, doc_ids) -> x."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return super().forward(inputs[0])


def pipe_batches(micro_batches: list[tuple[torch.Tensor, ...]]) -> list[tuple]:
    """(tokens, labels[, position_ids, doc_ids]) -> DeepSpeed's (inputs, labels) pairs."""
    return [((x, *ids) if ids else x, y) for x, y, *ids in micro_batches]


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
    docs = cfg.data.document_mask
    embedding, block, final_norm = (
        (DocEmbedding, DocSeededBlock, DocFinalNorm) if docs else (Embedding, SeededBlock, FinalNorm)
    )
    layers = [
        TiedLayerSpec("embed", embedding, *embed_args, tied_weight_attr="tok_emb.weight")
        if tied
        else LayerSpec(embedding, *embed_args)
    ]
    layers += [LayerSpec(block, m, group, sp, component_seed(init_seed, 1 + i), cp_group) for i in range(L)]
    layers.append(LayerSpec(final_norm, m, group, sp))
    if tied:
        layers.append(
            TiedLayerSpec(
                "embed", embedding, *embed_args, forward_fn=_tied_logits, tied_weight_attr="tok_emb.weight"
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


class _HookedPhase:
    """A phase of ``timer`` opened in one hook and closed in another (both idempotent)."""

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name, self.entered = timer, name, None

    def open(self, *_) -> None:
        if self.entered is None:
            self.entered = self.timer.phase(self.name)
            self.entered.__enter__()

    def close(self, *_) -> None:
        if self.entered is not None:
            entered, self.entered = self.entered, None
            entered.__exit__(None, None, None)


@contextlib.contextmanager
def timed_phases(module: torch.nn.Module, timer: PhaseTimer) -> Iterator[None]:
    """Report this stage's ``forward``, ``backward`` and ``optimizer`` phases to ``timer``.

    The 1F1B schedule runs inside ``engine.train_batch``, so the phases open and close in
    hooks: forward around the stage module (forward pre-hook to forward hook) and, on the
    last stage, around its ``loss_fn`` (wrapped while the context is open); backward from
    the arrival of the gradient of the stage output or loss (a tensor hook) until every
    parameter of the stage has its gradient (``register_multi_grad_hook``); optimizer
    around the ``torch.optim`` step (global step hooks, which run outside the optimizer's
    own hooks, so :class:`MeasuredClipping` counts; clipping inside DeepSpeed's mixed
    precision or ZeRO optimizers before that step does not). Sends, receives and
    gradient reductions are in no phase.
    """
    fwd, bwd, opt = (_HookedPhase(timer, name) for name in ("forward", "backward", "optimizer"))

    def forward_done(_module, _args, out) -> None:
        fwd.close()
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(lambda _grad: bwd.open())

    loss_fn = module.loss_fn

    def timed_loss(outputs, labels):
        fwd.open()
        loss = loss_fn(outputs, labels)
        forward_done(None, None, loss)
        return loss

    handles = [
        module.register_forward_pre_hook(fwd.open),
        module.register_forward_hook(forward_done),
        torch.autograd.graph.register_multi_grad_hook(
            [p for p in module.parameters() if p.requires_grad], bwd.close, mode="all"
        ),
        register_optimizer_step_pre_hook(opt.open),
        register_optimizer_step_post_hook(opt.close),
    ]
    module.loss_fn = timed_loss if loss_fn is not None else None
    try:
        yield
    finally:
        module.loss_fn = loss_fn
        for handle in handles:
            handle.remove()


def pipeline_train_step(
    engine, micro_batches: list[tuple[torch.Tensor, ...]], timer: PhaseTimer | None = None
) -> torch.Tensor:
    """One optimizer step over ``accum`` micro-batches (1F1B); the data-parallel mean loss as a
    0-d tensor on the device (DeepSpeed broadcasts it from the last stage; not read here).

    ``timer`` (optional) gets the stage's phases through :func:`timed_phases`.
    """
    with timed_phases(engine.module, timer) if timer is not None else contextlib.nullcontext():
        return engine.train_batch(data_iter=iter(pipe_batches(micro_batches))).detach()


def pipeline_eval_loss(engine, micro_batches: list[tuple[torch.Tensor, ...]], accum: int) -> float:
    """Mean loss over micro-batches, ``accum`` per pipeline flush (every rank gets it)."""
    batches = pipe_batches(micro_batches)
    losses = [float(engine.eval_batch(iter(batches[i : i + accum]))) for i in range(0, len(batches), accum)]
    return sum(losses) / len(losses)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B/GPipe schedule: ``(p - 1) / (m + p - 1)``
    (Narayanan et al. 2021, section 2.2.1)."""
    return (pp - 1) / (micro_batches + pp - 1)
