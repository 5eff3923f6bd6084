"""Parameter count and training FLOPs per token, from the config alone.

Conventions (printed next to every MFU number):

- A multiply-add is 2 FLOPs. Training = forward + backward = 3x forward
  (backward computes gradients for both inputs and weights).
- Dense matmul FLOPs per token: ``6 N_mm`` where ``N_mm`` counts every weight
  that takes part in a matmul, including the output head but not the embedding
  lookups (Kaplan et al. 2020, eq. 2.1 / Table 1; Narayanan et al. 2021, eq. 3).
- Attention scores and values add, per layer and token, ``2 * 2 * T * C`` forward
  FLOPs for ``Q K^T`` and ``A V`` -> ``12 L T C`` for training. This is the
  *non-causal* convention of PaLM (Chowdhery et al. 2022, appendix B) and
  Megatron-LM, which is what MFU is computed with. The *causal* count skips the
  masked upper triangle and halves it: ``6 L T C``.
"""

from __future__ import annotations

from megalm.config import ModelConfig
from megalm.model.gpt import padded_vocab_size, ties_embeddings
from megalm.model.layers import ffn_hidden_size


def matmul_params_per_layer(cfg: ModelConfig) -> int:
    """Weights of one block that take part in matmuls (no biases, no norms)."""
    C = cfg.d_model
    kv = (cfg.n_kv_heads or cfg.n_heads) * (C // cfg.n_heads)
    attn = C * C * 2 + C * kv * 2  # wq, wo, wk, wv
    H = ffn_hidden_size(cfg)
    mlp = (3 if cfg.family == "llama" else 2) * C * H
    return attn + mlp


def param_count(cfg: ModelConfig, tp: int = 1) -> int:
    """Exact number of trainable parameters of :class:`megalm.model.GPT` (all TP shards
    together), with the vocabulary padded as :func:`padded_vocab_size` does for ``tp``."""
    C, V, L = cfg.d_model, padded_vocab_size(cfg, tp), cfg.n_layers
    kv = (cfg.n_kv_heads or cfg.n_heads) * (C // cfg.n_heads)
    H = ffn_hidden_size(cfg)
    per_layer = matmul_params_per_layer(cfg)
    if cfg.family == "gpt2":
        per_layer += 2 * C + 2 * kv  # attention biases: wq, wo (C each), wk, wv (kv each)
        per_layer += H + C  # MLP biases
        per_layer += 2 * 2 * C  # two LayerNorms (gain + bias)
        final_norm = 2 * C
        pos = cfg.seq_len * C
    else:
        per_layer += 2 * C  # two RMSNorm gains
        final_norm = C
        pos = 0
    head = 0 if ties_embeddings(cfg) else V * C
    return V * C + pos + L * per_layer + final_norm + head


def flops_per_token(cfg: ModelConfig, causal: bool = False) -> float:
    """Training FLOPs per token: ``6 N_mm + 12 L T C`` (non-causal) or ``6 N_mm + 6 L T C``.

    ``N_mm = L * matmul_params_per_layer + V * C`` (the head, padded vocabulary:
    the padded columns are computed too). See the module docstring for the sources.
    """
    n_mm = cfg.n_layers * matmul_params_per_layer(cfg) + padded_vocab_size(cfg) * cfg.d_model
    attn = 12 * cfg.n_layers * cfg.seq_len * cfg.d_model
    return 6.0 * n_mm + (attn / 2 if causal else attn)
