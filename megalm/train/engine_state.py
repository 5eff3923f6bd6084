"""A DeepSpeed engine's training state as global (tp = 1) tensors, and back, at any layout.

Reading and writing go through DeepSpeed's tensor-fragment API
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and the
``safe_set_full_*`` twins), which hides how ZeRO 1/2/3 and the bf16 optimizer partition
the fp32 master weights and AdamW moments over data-parallel ranks: every data-parallel
rank gets (or sets) the whole tensor of its tensor-parallel shard. Which part of the global
tensor that shard is comes from the layer that holds it (column / row / vocabulary
parallel, or replicated: ``megalm/parallel/layers.py``).

Two gaps of DeepSpeed 0.19 are filled here, in :func:`prepare_optimizer_state`:

- AdamW state is created lazily at the first step, so a resume has nothing to set yet:
  the state is created as ``torch.optim.AdamW`` would (zero moments) before setting it;
- ZeRO 1/2 and the bf16 optimizer link their per-parameter views of the moments once,
  after the first step of the first parameter group, so the other group (biases and
  norm gains) has none ("exp_avg not found in optimizer state fragment"): the views are
  linked again, through the optimizer's own ``_lazy_init_hp_params_optimizer_state``.

Without a DeepSpeed wrapper (ZeRO-0 in fp32) the parameter is the master copy and the
torch optimizer's state holds the moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megalm.checkpoint.tensors import MOMENTS, Box, volume
from megalm.model.gpt import Head
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalm.parallel.mappings import tp_rank, tp_size

# ZeRO-1/2 / bf16 optimizer, ZeRO-3: the flat fp32 partitions their torch optimizer steps.
_FLAT_FP32 = ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat")


@dataclass
class LocalParam:
    """One parameter of this rank and the part of a global tensor it holds.

    Attributes:
        name: global name, as in :class:`megalm.model.GPT` (``blocks.0.attn.wq.weight``).
        box: ``((start, stop), ...)`` per dimension of the global tensor.
        shape: global shape at this layout (vocabulary rows padded for this tp).
        saves: this (tp, pp) cell saves it (TP-replicated tensors: tp rank 0; a pipeline's
            tied embedding: the first stage's copy).
        vocab_dim: the dimension padded to the vocabulary, or ``None``.
    """

    param: nn.Parameter
    name: str
    box: Box
    shape: tuple[int, ...]
    saves: bool
    vocab_dim: int | None


def global_name(local: str, n_layers: int, pipelined: bool) -> str:
    """GPT name of a parameter of the engine's module.

    Pipeline layers are numbered ``0`` embedding, ``1..L`` blocks, ``L+1`` final norm,
    ``L+2`` head (``megalm/train/pipeline.py``); a tied embedding lives in
    ``tied_modules.embed``.
    """
    if not pipelined:
        return local
    head, _, rest = local.partition(".")
    if head == "tied_modules":
        return "embed." + rest.partition(".")[2]
    i = int(head)
    if i == 0:
        return "embed." + rest
    if i <= n_layers:
        return f"blocks.{i - 1}.{rest}"
    return ("final_norm." if i == n_layers + 1 else "head.") + rest


def _split_dim(module: nn.Module, attr: str) -> int | None:
    """The dimension along which tensor parallelism splits ``module.<attr>``, or ``None``."""
    if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
        return 0 if tp_size(module.group) > 1 else None
    if isinstance(module, RowParallelLinear) and attr == "weight":
        return 1 if tp_size(module.group) > 1 else None
    return None


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # ZeRO-3: partitioned


def local_params(module: nn.Module, tp_rank0: int, n_layers: int, pipelined: bool) -> list[LocalParam]:
    """Every parameter of ``module`` (this rank's), in module order (the same on every data-parallel
    rank); ``tp_rank0``: this rank's tensor-parallel rank (replicated tensors are saved by rank 0)."""
    vocab_modules = {id(m) for m in module.modules() if isinstance(m, VocabParallelEmbedding)}
    vocab_modules |= {id(m.proj) for m in module.modules() if isinstance(m, Head)}
    out = []
    for mod_name, mod in module.named_modules():
        for attr, p in mod.named_parameters(recurse=False):
            local = f"{mod_name}.{attr}" if mod_name else attr
            shape, dim = list(_shape(p)), _split_dim(mod, attr)
            box = [(0, n) for n in shape]
            if dim is not None:
                n, r = shape[dim], tp_rank(mod.group)
                box[dim], shape[dim] = (r * n, (r + 1) * n), n * tp_size(mod.group)
            saves = (dim is not None or tp_rank0 == 0) and not getattr(p, "ds_pipe_replicated", False)
            vocab_dim = 0 if id(mod) in vocab_modules and attr == "weight" else None
            name = global_name(local, n_layers, pipelined)
            out.append(LocalParam(p, name, tuple(box), tuple(shape), saves, vocab_dim))
    return out


def assign_writers(params: list[LocalParam], dp: int) -> list[int]:
    """Data-parallel rank that writes each saved parameter: largest first to the least loaded
    rank, so every rank writes about ``1/dp`` of the bytes (-1: not saved by this cell)."""
    load, owner = [0] * dp, [-1] * len(params)
    sizes = [volume(lp.box) for lp in params]
    for i in sorted((i for i, lp in enumerate(params) if lp.saves), key=lambda i: -sizes[i]):
        r = min(range(dp), key=lambda k: load[k])
        owner[i], load[r] = r, load[r] + sizes[i]
    return owner


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (inside its ZeRO / bf16 wrapper, if any)."""
    opt = engine.optimizer
    return opt.optimizer if any(hasattr(opt, a) for a in _FLAT_FP32) else opt


def _fp32_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps AdamW state for."""
    opt = engine.optimizer
    for attr in _FLAT_FP32:
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return [p for g in opt.param_groups for p in g["params"]]


def _step_tensor(step: int, group: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    """``state["step"]`` as torch's AdamW keeps it: fp32, on the device for fused/capturable."""
    device = like.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def prepare_optimizer_state(engine) -> None:
    """Create missing AdamW states (zero moments, step 0) and link DeepSpeed's views of them."""
    base = base_optimizer(engine)
    group = base.param_groups[0]
    for t in _fp32_tensors(engine):
        state = base.state[t]
        if "exp_avg" not in state:
            state.update(
                step=_step_tensor(0, group, t),
                exp_avg=torch.zeros_like(t, memory_format=torch.preserve_format),
                exp_avg_sq=torch.zeros_like(t, memory_format=torch.preserve_format),
            )
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def optimizer_step(engine) -> int:
    """AdamW's step count (its bias correction), which may differ from the training step."""
    base = base_optimizer(engine)
    for t in _fp32_tensors(engine):
        if "step" in base.state.get(t, {}):
            return int(base.state[t]["step"])
    return int(base.param_groups[0].get("step", 0))  # apex FusedAdam keeps it per group


def set_optimizer_step(engine, step: int) -> None:
    base = base_optimizer(engine)
    for t in _fp32_tensors(engine):
        base.state[t]["step"] = _step_tensor(step, base.param_groups[0], t)
    if type(base).__name__ == "FusedAdam":
        for g in base.param_groups:
            g["step"] = step


def _wrapped(p: nn.Parameter) -> bool:
    """Managed by a DeepSpeed optimizer (its ``_hp_mapping`` is ``None`` where this rank's
    partition holds no part of it, but the gather is still collective)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def read_full(engine, p: nn.Parameter, key: str | None) -> torch.Tensor:
    """Collective over ``p``'s data-parallel group: the fp32 weight (``key=None``) or moment
    ``key`` of this rank's whole tensor-parallel shard."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _wrapped(p):
        return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if key is None:
        return p.data.float()
    state = base_optimizer(engine).state.get(p, {})
    return state[key] if key in state else torch.zeros_like(p.data, dtype=torch.float32)


def write_full(engine, p: nn.Parameter, key: str | None, value: torch.Tensor) -> None:
    """Collective for ZeRO-3 weights: set the weight or moment ``key`` of this rank's shard
    from its whole fp32 value (the low-precision copy follows the weight)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not _wrapped(p):
        (p.data if key is None else base_optimizer(engine).state[p][key]).copy_(value)
        return
    if key is not None:
        safe_set_full_optimizer_state(p, value, key)
        return
    safe_set_full_fp32_param(p, value)
    if hasattr(p, "ds_id"):  # ZeRO-3: the partitioned model copy, re-partitioned from dp rank 0
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.reshape(p.shape))
    else:
        p.data.copy_(value)


def gather_pieces(
    engine, params: list[LocalParam], writers: list[int], dp_rank: int, staging: dict[str, torch.Tensor]
) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Collective over each data-parallel group: this rank's pieces, copied to host memory.

    Args:
        staging: host buffers by key, reused from save to save (allocated on first use,
            pinned on CUDA): copying into memory already mapped is several times faster than
            allocating it each time. The caller must not reuse them while a write is in flight.

    Returns:
        (model pieces, optimizer pieces): ``{key: (cpu fp32 tensor, box, global shape, vocab dim)}``.
    """
    model: dict[str, tuple] = {}
    optim: dict[str, tuple] = {}
    for lp, writer in zip(params, writers, strict=True):
        if writer < 0:
            continue
        for moment in (None, *MOMENTS):
            value = read_full(engine, lp.param, moment)
            if writer != dp_rank:
                continue
            key = lp.name if moment is None else f"{moment}/{lp.name}"
            shape = [hi - lo for lo, hi in lp.box]
            host = staging.get(key)
            if host is None or list(host.shape) != shape:
                host = torch.empty(shape, dtype=torch.float32, pin_memory=value.is_cuda)
                staging[key] = host
            host.copy_(value.detach().reshape(shape), non_blocking=True)
            (model if moment is None else optim)[key] = (host, lp.box, lp.shape, lp.vocab_dim)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies are done
    return model, optim


def engine_counters(engine) -> dict[str, Any]:
    """DeepSpeed's own step counters and loss scale (fp16), layout-free."""
    counters = {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "skipped_steps")}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        counters["loss_scaler"] = {
            k: v
            for k, v in vars(scaler).items()
            if isinstance(v, (int, float, bool)) and not k.startswith("_")
        }
    return counters


def set_engine_counters(engine, counters: dict[str, Any]) -> None:
    for k in ("global_steps", "global_samples", "skipped_steps"):
        if k in counters:
            setattr(engine, k, counters[k])
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        for k, v in counters.get("loss_scaler", {}).items():
            setattr(scaler, k, v)
