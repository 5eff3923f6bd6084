"""Does a checkpoint hold the model this run builds? One sentence naming what differs.

The expected tensors come from the model itself (:func:`megalm.model.build_model`), built on the ``meta``
device at tp = 1 (no memory, no second description of the model). Shapes are compared
with the vocabulary dimension at its real size (``model.vocab_size``), since the padding
depends on the tensor-parallel degree and is resharded freely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megalm.checkpoint.tensors import TensorIndex
from megalm.config import Config, ModelConfig
from megalm.model import build_model
from megalm.train.engine_state import local_params

SHOWN = 4  # names listed per kind of difference


def expected_tensors(model: ModelConfig) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """``{global name: (shape at tp = 1, vocabulary dimension)}`` of the model ``model`` describes."""
    with torch.device("meta"):
        built = build_model(model, init_seed=0)
    return {lp.name: (lp.shape, lp.vocab_dim) for lp in local_params(built, 0, model.n_layers, False)}


def _logical(shape: tuple[int, ...], vocab_dim: int | None, vocab: int) -> tuple[int, ...]:
    return shape if vocab_dim is None else shape[:vocab_dim] + (vocab,) + shape[vocab_dim + 1 :]


def _names(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _config_diff(saved: dict[str, Any], model: ModelConfig) -> str:
    here = vars(model)
    keys = [k for k in here if k in saved and saved[k] != here[k] and k not in ("kernels", "dropout")]
    return ", ".join(f"model.{k}={saved[k]} (this run: {here[k]})" for k in keys)


def shape_problem(path: Path, meta: dict[str, Any], saved: TensorIndex, cfg: Config) -> str | None:
    """The differences between tag ``path``'s model tensors and this run's model, or ``None``."""
    saved_model = meta.get("config", {}).get("model", {})
    saved_vocab = int(saved_model.get("vocab_size", cfg.model.vocab_size))
    want = expected_tensors(cfg.model)
    have = {k: _logical(saved.shapes[k], saved.vocab_dims.get(k), saved_vocab) for k in saved.shapes}
    missing = sorted(k for k in want if k not in have)
    extra = sorted(k for k in have if k not in want)
    differ = [
        f"{k} {have[k]} saved vs {_logical(s, v, cfg.model.vocab_size)} here"
        for k, (s, v) in sorted(want.items())
        if k in have and have[k] != _logical(s, v, cfg.model.vocab_size)
    ]
    if not (missing or extra or differ):
        return None
    parts = [f"missing {_names(missing)}" if missing else "", f"unexpected {_names(extra)}" if extra else ""]
    parts.append(f"different shapes: {_names(differ)}" if differ else "")
    diff = _config_diff(saved_model, cfg.model)
    saved_with = f"; it was saved with {diff}" if diff else ""
    return (
        f"checkpoint '{path}' holds another model than this run's: {'; '.join(p for p in parts if p)}"
        f"{saved_with}; resume with the model.* settings it was saved with, or start fresh with "
        "training.resume=never"
    )
