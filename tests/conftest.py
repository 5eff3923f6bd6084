"""Shared fixtures: a small tokenized corpus built once per session from the stdlib."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent


def subprocess_env() -> dict[str, str]:
    """Environment for launching ``launch/*.py`` and ``deepspeed``/``torchrun`` in tests."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    # DeepSpeed JIT-builds its CPU shared-memory comm op; a cache per venv is built once,
    # while a cache shared with other venvs (other flags) is rebuilt at every start.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions"))
    # Launched runs take their real kernel path: compiled Triton on CUDA, never an
    # interpreter a kernel test scoped to itself (tests/kernels/conftest.py).
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~1.5 MB of stdlib source as ``stdlib.jsonl``."""
    from data_tools.stdlib_corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, max_mb=1.5)
    return out


@pytest.fixture(scope="session")
def tokenizer_path(corpus_dir, tmp_path_factory) -> Path:
    from data_tools.train_tokenizer import train_tokenizer

    return train_tokenizer([str(corpus_dir)], 512, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def shards_dir(corpus_dir, tokenizer_path, tmp_path_factory) -> Path:
    """Tokenized train/val shards (several train shards) with a manifest."""
    from data_tools.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards")
    preprocess([str(corpus_dir)], tokenizer_path, out, workers=1, shard_tokens=150_000, val_fraction=0.1)
    return out


def tiny_overrides(run_dir: Path, data_dir: Path, **extra: object) -> list[str]:
    """Overrides that make configs/tiny.yaml a seconds-long run on the test shards."""
    base = {
        "run.dir": run_dir,
        "data.dir": data_dir,
        "model.n_layers": 2,
        "model.d_model": 64,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.seq_len": 64,
        "training.max_steps": 20,
        "training.global_batch": 8,
        "training.micro_batch": 2,
        "training.log_interval": 1,
        "training.eval_interval": 10,
        "training.eval_batches": 1,
        "training.save_interval": 10,
        "training.sample_tokens": 8,
        "optim.warmup_steps": 5,
        "optim.decay_steps": 20,  # fixed, so a 10-step run then a resume to 20 has the same schedule
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
