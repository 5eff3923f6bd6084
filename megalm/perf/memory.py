"""Bytes per device: model states under ZeRO and activations under TP/SP/PP/recompute.

Model states (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", section 5.1 and Figure 1). With ``Psi`` parameters on a
device, ``N_d`` data-parallel ranks and mixed-precision Adam (2-byte parameters and
gradients, ``K = 12`` bytes of fp32 master weights, momentum and variance)::

    stage 0: (2 + 2 + K) Psi          stage 2: 2 Psi + (2 + K) Psi / N_d
    stage 1: (2 + 2) Psi + K Psi / N_d   stage 3: (2 + 2 + K) Psi / N_d

:class:`StateBytes` generalizes the per-parameter byte counts so that pure fp32
training (no master copy) is the same formula with 4 + 4 + 8.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 4, Table 2), per layer with sequence ``s``, micro-batch
``b``, hidden ``h``, ``a`` heads and TP degree ``t``, in 16-bit with dropout::

    no parallelism                 s b h (34 + 5 a s / h)
    TP                             s b h (10 + 24/t + 5 a s / (h t))
    TP + SP                        s b h (34/t + 5 a s / (h t))
    TP + selective recompute       s b h (10 + 24/t)
    TP + SP + selective recompute  s b h (34/t)
    full recompute                 2 s b h   (the layer input only; / t with SP)

:func:`layer_activation_bytes` derives these from a list of stored tensors so that
the same accounting covers megalm's own model (GQA, SwiGLU, no dropout, flash
attention that stores no ``s x s`` matrix, fp32 on CPU): :class:`Recipe` says what
the implementation keeps. With a 1F1B pipeline schedule the first stage holds ``p``
micro-batches of ``L/p`` layers, i.e. ``L`` layers' worth (Korthikanti et al. 2022,
section 4.2.3); an interleaved schedule multiplies that by ``1 + (p-1)/(p v)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megalm.config import ModelConfig
from megalm.perf.flops import param_count

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state (ZeRO paper notation: 2 + 2 + K)."""

    param: int  # the copy the model computes with (2 for bf16/fp16, 4 for fp32)
    grad: int
    optimizer: int  # K: fp32 master copy (mixed precision only) + Adam momentum + variance

    @classmethod
    def mixed_adam(cls) -> StateBytes:
        """bf16/fp16 weights and gradients, fp32 master + Adam states: 2 + 2 + 12."""
        return cls(2, 2, 12)

    @classmethod
    def fp32_adam(cls) -> StateBytes:
        """fp32 weights, gradients and Adam states, no master copy: 4 + 4 + 8."""
        return cls(4, 4, 8)


def zero_model_state_bytes(
    params: float, dp: int, stage: int, b: StateBytes | None = None
) -> dict[str, float]:
    """Parameter, gradient and optimizer bytes per device under ZeRO ``stage``.

    Args:
        params: ``Psi``, parameters on this device (already divided by TP x PP).
        dp: ``N_d``, data-parallel ranks the states are partitioned over.
        stage: 0 (plain DP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters).
        b: bytes per parameter; default mixed-precision Adam (Rajbhandari et al. 2020).

    Returns:
        ``{"params", "grads", "optimizer", "total"}`` in bytes.
    """
    b = b or StateBytes.mixed_adam()
    p = params * b.param / (dp if stage >= 3 else 1)
    g = params * b.grad / (dp if stage >= 2 else 1)
    o = params * b.optimizer / (dp if stage >= 1 else 1)
    return {"params": p, "grads": g, "optimizer": o, "total": p + g + o}


def engine_fp32_state_bytes(
    params: float, dp: int, stage: int, reduce_bucket_elements: float = 5e8
) -> dict[str, float]:
    """What DeepSpeed 0.16-0.19 keeps per rank for fp32 training with Adam, after a backward.

    Measured (``tests/test_benchmark.py``), not the paper's idealization:

    - stage 0: ``4 + 4 + 8`` bytes per parameter, as :func:`zero_model_state_bytes`;
    - stages 1 and 2 are the same code path: full fp32 parameters ``4 Psi``; the gradients
      are reduced into this rank's partition during the backward (``4 Psi / N_d``); an
      fp32 "master" partition is kept even in fp32 (``single_partition_of_fp32_groups``)
      next to Adam's momentum and variance (``12 Psi / N_d``);
    - stage 3: parameter, gradient, master and Adam partitions (``20 Psi / N_d``) plus an
      fp32 gradient bucket of ``reduce_bucket_size`` elements (DeepSpeed's default 5e8 =
      2 GB whatever the model; megalm caps it at the model size,
      :func:`megalm.train.engine.zero_bucket_elements`).
    """
    if stage == 0:
        return zero_model_state_bytes(params, dp, 0, StateBytes.fp32_adam())
    if stage in (1, 2):
        p, g, o = 4 * params, 4 * params / dp, 12 * params / dp
    else:
        p, g, o = 4 * params / dp, 4 * params / dp + 4 * reduce_bucket_elements, 12 * params / dp
    return {"params": p, "grads": g, "optimizer": o, "total": p + g + o}


@dataclass(frozen=True)
class Recipe:
    """What an implementation stores for backward, in the units of Korthikanti et al. 2022.

    Attributes:
        act_bytes: bytes per activation element (2 for 16-bit, 4 for fp32).
        mask_bytes: bytes per dropout-mask element (1 with dropout, 0 without).
        materialized_scores: attention keeps ``a s^2 b`` softmax (and dropout)
            tensors; ``False`` for flash attention, which keeps a log-sum-exp per row.
        norm_extra: extra ``s b h`` tensors a norm keeps besides its input (the
            PyTorch reference RMSNorm/LayerNorm keeps the normalized x: 1; fused: 0).
        logits_bytes: bytes per logit the cross entropy keeps (fp32: 4).
    """

    act_bytes: int = 2
    mask_bytes: int = 1
    materialized_scores: bool = True
    norm_extra: int = 0
    logits_bytes: int = 4

    @classmethod
    def paper(cls) -> Recipe:
        """Korthikanti et al. 2022's GPT: 16-bit, dropout, materialized softmax, fused norms."""
        return cls()

    @classmethod
    def megalm(cls, cfg: ModelConfig, dtype: str) -> Recipe:
        """megalm's model: flash attention (SDPA on CPU, Triton on GPU); its norms save
        their input and per-row statistics only, on both kernel paths (the Triton kernels
        and the hand-differentiated PyTorch RMSNorm / native ``F.layer_norm``): ``norm_extra=0``."""
        return cls(
            act_bytes=4 if dtype == "fp32" else 2,
            mask_bytes=1 if cfg.dropout > 0 else 0,
            materialized_scores=False,
            norm_extra=0,
            logits_bytes=4,
        )


def layer_activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    tp: int = 1,
    sp: bool = False,
    recompute: Recompute = "none",
    recipe: Recipe | None = None,
) -> float:
    """Bytes one transformer layer keeps for backward (Korthikanti et al. 2022, section 4.1).

    The tensors, in ``s b h`` units of ``e`` bytes (``kv``: K/V width / h, ``f``: MLP width / h):

    - attention: norm input (1 + norm_extra), QKV input 1, Q 1, K kv, V kv, projection
      input 1, dropout mask (mask bytes); softmax output, its dropout mask and output
      ``a s / h`` each when materialized (5 a s / h in 16-bit with dropout);
      flash attention keeps 4 bytes of log-sum-exp per head and row instead;
    - MLP: norm input (1 + norm_extra), input 1, GELU input and output f each (SwiGLU:
      W1 out, SiLU out, W3 out, product: 4 f), dropout mask.

    Tensor parallelism divides the per-head and MLP-width tensors by ``t``; sequence
    parallelism divides the rest too. For the paper's GPT (:meth:`Recipe.paper`) this is
    ``s b h (34 + 5 a s / h)``; selective recompute drops the ``s x s`` terms and full
    recompute keeps only the layer input.
    """
    r = recipe or Recipe.paper()
    s, b, h, a = cfg.seq_len, micro_batch, cfg.d_model, cfg.n_heads
    e, m = r.act_bytes, r.mask_bytes
    sbh = s * b * h
    rep = 1 / tp if sp else 1.0  # replicated-region tensors: split by SP only
    if recompute == "full":
        return e * sbh * rep
    kv = cfg.kv_heads / cfg.n_heads
    f = cfg.ffn_size / h
    # tensors outside the TP region (norm inputs, QKV/MLP inputs, dropout masks)
    replicated = 2 * e * (1 + r.norm_extra) + 2 * e + 2 * m
    # inside the TP region: Q, K, V, projection input, MLP hidden tensors
    mlp_hidden = (4 if cfg.family == "llama" else 2) * f
    sharded = e * (1 + 2 * kv + 1 + mlp_hidden)
    per_layer = sbh * (replicated * rep + sharded / tp)
    if r.materialized_scores and recompute != "selective":
        per_layer += (2 * e + m if m else e) * a * s * s * b / tp  # softmax out (+ mask + dropout out)
    elif not r.materialized_scores:
        per_layer += 4 * a * s * b / tp  # flash attention: fp32 log-sum-exp per head and row
    return per_layer


def head_activation_bytes(
    cfg: ModelConfig, micro_batch: int, tp: int = 1, sp: bool = False, recipe: Recipe | None = None
) -> float:
    """Embedding dropout mask, final norm, head input and the cross-entropy logits.

    Korthikanti et al. 2022, section 4.3: the output layer keeps its input (``e s b h``)
    and the cross entropy the logits in fp32 (``4 s b V / t``).
    """
    r = recipe or Recipe.paper()
    s, b, h = cfg.seq_len, micro_batch, cfg.d_model
    rep = 1 / tp if sp else 1.0
    sbh = s * b * h
    rest = sbh * (r.mask_bytes + r.act_bytes * (1 + r.norm_extra)) * rep + r.act_bytes * sbh
    return rest + r.logits_bytes * s * b * cfg.padded_vocab(tp) / tp


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int,
    tp: int = 1,
    pp: int = 1,
    sp: bool = False,
    recompute: Recompute = "none",
    recipe: Recipe | None = None,
    n_micro: int | None = None,
) -> float:
    """Peak activation bytes on the busiest pipeline stage (the first) under 1F1B.

    The first stage keeps ``min(p, n_micro)`` micro-batches of ``L/p`` layers
    (Korthikanti et al. 2022, sec. 4.2.3); with ``pp = 1`` that is one micro-batch of
    ``L`` layers plus the head. With ``pp > 1`` the last stage's head is compared
    against the first stage and the larger is returned.
    """
    in_flight = pp if n_micro is None else min(pp, n_micro)
    layers = -(-cfg.n_layers // pp)
    per_layer = layer_activation_bytes(cfg, micro_batch, tp, sp, recompute, recipe)
    head = head_activation_bytes(cfg, micro_batch, tp, sp, recipe)
    if pp == 1:
        return cfg.n_layers * per_layer + head
    first = layers * per_layer * in_flight
    last = layers * per_layer + head
    return max(first, last)


def params_per_device(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> float:
    """Parameters held by the busiest device: transformer layers split by ``tp * pp``,
    embedding and head split by ``tp`` and held by the first/last stage.

    With ``pp = 1`` this is exactly :func:`param_count` / tp for the TP-split weights
    (norm gains and biases replicated are small and counted as split)."""
    total = param_count(cfg, tp)
    if pp == 1:
        return total / tp
    v, h = cfg.padded_vocab(tp), cfg.d_model
    emb = v * h * (1 if cfg.tied else 2) + (cfg.seq_len * h if cfg.family == "gpt2" else 0)
    layers = total - emb
    per_stage_layers = layers * (-(-cfg.n_layers // pp)) / cfg.n_layers
    return (per_stage_layers + v * h) / tp
