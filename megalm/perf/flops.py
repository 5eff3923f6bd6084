"""Model FLOPs, hardware FLOPs (with activation recompute), MFU, HFU and device peaks.

Conventions (every number megalm prints names the one it used):

- A multiply-add is 2 FLOPs; training = forward + backward = 3 x forward.
- Model FLOPs per token (:func:`model_flops_per_token`): ``6 N_mm + 12 L T d``
  with non-causal attention (PaLM, Chowdhery et al. 2022, appendix B; Narayanan
  et al. 2021, eq. 3 without the recompute pass), or ``6 N_mm + 6 L T d`` counting
  only the causal (lower) triangle of ``Q K^T`` and ``A V``. ``N_mm`` counts every
  matmul weight including the head, so it is GQA- and SwiGLU-aware: ``wk``/``wv``
  are ``d x d_kv`` and a SwiGLU MLP has three ``d x H`` matrices
  (:func:`matmul_params_per_layer`).
- Hardware FLOPs per token (:func:`hardware_flops_per_token`) add the forward
  work that activation recompute repeats in the backward pass (Korthikanti et al.
  2022, section 5 and appendix A): full recompute reruns each layer's forward
  (``+2 N_layer + 4 L T d``); selective recompute reruns only the attention core
  (``+4 L T d``, ``Q K^T`` and ``A V``). The output head is never recomputed.
  With full recompute this is exactly Narayanan et al. 2021, eq. 3:
  ``F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h))`` per iteration for a GPT.
- MFU = model FLOP/s per device / peak; HFU = hardware FLOP/s per device / peak
  (Chowdhery et al. 2022, appendix B). The peak is the dense bf16 datasheet value
  (:data:`megalm.perf.devices.DEVICES`), never the 2:4-sparsity figure, or a measured
  matmul rate (:func:`megalm.perf.devices.peak_flops`). :func:`utilization` is the one
  function that turns tokens/s into MFU, for the trainer and the benchmark alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megalm.config import ModelConfig

Recompute = Literal["none", "selective", "full"]

MODEL_FLOPS_FORMULA = "model FLOPs/token = 6*N_mm + 12*L*T*d (non-causal attention; causal: 6*L*T*d)"
HW_FLOPS_FORMULA = (
    "hardware FLOPs/token = model FLOPs + recompute (full: 2*N_layers_mm + 4*L*T*d; selective: 4*L*T*d)"
)


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one block that take part in matmuls (no biases, no norms): ``wq``, ``wo``
    (``d x d``), ``wk``, ``wv`` (``d x d_kv``, GQA-aware) and two (gpt2) or three (SwiGLU)
    ``d x H`` MLP matrices. LSTM (``model.family=lstm``): the four gates' input and
    recurrent matrices, ``4 (d x d + d x d)`` (Hochreiter & Schmidhuber 1997)."""
    if cfg.family == "lstm":
        return 8 * cfg.d_model * cfg.d_model
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_size
    return 2 * d * d + 2 * d * kv + (3 if cfg.family == "llama" else 2) * d * cfg.ffn_size


def param_count(cfg: ModelConfig, tp: int = 1) -> int:
    """Exact number of trainable parameters of :class:`megalm.model.GPT` (all TP shards
    together), with the vocabulary padded as :meth:`ModelConfig.padded_vocab` does for ``tp``."""
    d, V, L = cfg.d_model, cfg.padded_vocab(tp), cfg.n_layers
    kv, H = cfg.kv_heads * cfg.head_size, cfg.ffn_size
    per_layer = matmul_params_per_layer(cfg)
    if cfg.family == "lstm":  # megalm.model.lstm.LSTMLM: two bias vectors of 4 d per layer
        return V * d + L * (per_layer + 8 * d) + (0 if cfg.tied else V * d)
    if cfg.family == "gpt2":
        per_layer += 2 * d + 2 * kv  # attention biases: wq, wo (d each), wk, wv (kv each)
        per_layer += H + d  # MLP biases
        per_layer += 2 * 2 * d  # two LayerNorms (gain + bias)
        final_norm, pos = 2 * d, cfg.seq_len * d
    else:
        per_layer += 2 * d  # two RMSNorm gains
        final_norm, pos = d, 0
    head = 0 if cfg.tied else V * d
    return V * d + pos + L * per_layer + final_norm + head


def head_params(cfg: ModelConfig, tp: int = 1) -> int:
    """Matmul weights of the output head: ``V_padded * d`` (computed even when tied)."""
    return cfg.padded_vocab(tp) * cfg.d_model


def model_flops_per_token(cfg: ModelConfig, causal: bool = False) -> float:
    """Training model FLOPs per token: ``6 N_mm + 12 L T d`` (``6 L T d`` if ``causal``),
    ``N_mm = L * matmul_params_per_layer + V_padded * d`` (the padded head columns are
    computed too). The one FLOPs count behind every MFU megalm prints. An LSTM has no
    attention term (``6 N_mm``)."""
    n_mm = cfg.n_layers * matmul_params_per_layer(cfg) + head_params(cfg)
    attn = 0 if cfg.family == "lstm" else 12 * cfg.n_layers * cfg.seq_len * cfg.d_model
    return 6.0 * n_mm + (attn / 2 if causal else attn)


def recompute_flops_per_token(cfg: ModelConfig, recompute: Recompute, causal: bool = False) -> float:
    """Forward FLOPs repeated in the backward pass, per token (Korthikanti et al. 2022).

    full: every layer's forward again, ``2 L N_layer_mm + 4 L T d``; selective: the
    attention core only, ``4 L T d``; halved attention terms if ``causal``.
    """
    attn_fwd = 4 * cfg.n_layers * cfg.seq_len * cfg.d_model / (2 if causal else 1)
    if recompute == "full":
        return 2.0 * cfg.n_layers * matmul_params_per_layer(cfg) + attn_fwd
    if recompute == "selective":
        return attn_fwd
    return 0.0


def hardware_flops_per_token(cfg: ModelConfig, recompute: Recompute = "none", causal: bool = False) -> float:
    """Model FLOPs plus recompute FLOPs per token (what the device actually executes)."""
    return model_flops_per_token(cfg, causal) + recompute_flops_per_token(cfg, recompute, causal)


def narayanan_flops_per_iteration(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021 (SC'21, "Efficient Large-Scale Language Model Training on
    GPU Clusters Using Megatron-LM"), eq. 3: FLOPs per iteration of a GPT with full
    activation recompute, ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``."""
    return 96.0 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def narayanan_training_days(params: float, tokens: float, gpus: int, flops_per_gpu: float) -> float:
    """Narayanan et al. 2021, eq. 4: end-to-end training time ``8 T P / (n X)`` (in days)."""
    return 8 * tokens * params / (gpus * flops_per_gpu) / 86400


@dataclass(frozen=True)
class Utilization:
    """Throughput numbers of one measurement and the conventions behind them."""

    tokens_per_s_per_device: float
    model_tflops_per_device: float
    hardware_tflops_per_device: float
    mfu: float
    hfu: float
    mfu_causal: float
    peak_tflops: float
    peak_source: str

    def formula(self) -> str:
        """One line naming the formulas and the peak; printed with every number."""
        return (
            f"{MODEL_FLOPS_FORMULA}; {HW_FLOPS_FORMULA}; MFU/HFU = FLOP/s per device / "
            f"peak {self.peak_tflops:.3f} TFLOP/s ({self.peak_source})"
        )


def utilization(
    cfg: ModelConfig,
    tokens_per_s: float,
    devices: int,
    peak_flops: float,
    peak_source: str,
    recompute: Recompute = "none",
) -> Utilization:
    """MFU and HFU of ``tokens_per_s`` (whole job) on ``devices`` devices.

    ``MFU = tokens_per_s / devices * model_flops_per_token / peak``; HFU uses the
    hardware FLOPs (recompute counted); ``mfu_causal`` uses the causal model count.
    """
    per_dev = tokens_per_s / devices
    model = per_dev * model_flops_per_token(cfg)
    hw = per_dev * hardware_flops_per_token(cfg, recompute)
    causal = per_dev * model_flops_per_token(cfg, causal=True)
    return Utilization(
        per_dev,
        model / 1e12,
        hw / 1e12,
        model / peak_flops,
        hw / peak_flops,
        causal / peak_flops,
        peak_flops / 1e12,
        peak_source,
    )
