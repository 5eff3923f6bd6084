"""Shared fixtures and settings of the test suite.

- Data, built once per session: ``corpus_dir``/``tokenizer_path``/``shards_dir`` (~1.5 MB of
  the stdlib's source, for the data tools) and ``golden_data`` (the fixed corpus
  ``tests/data/corpus.jsonl``: the data of the golden curves, see ``tests/golden``).
- ``golden_runs``: the single-process golden run of each family, made once per session on
  demand; ``pytest --update-golden`` rewrites ``tests/golden/*.json`` from them first and
  prints the diff.
- Timeouts: every timeout inside a test is ``scaled_timeout(seconds)``, ``seconds`` times
  ``MEGALM_TEST_TIMEOUT_FACTOR`` (default 1; e.g. 3 on a slow or loaded machine), and the
  factor scales pytest-timeout's per-test limit too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent


def subprocess_env() -> dict[str, str]:
    """Environment for launching ``launch/*.py`` and ``deepspeed``/``torchrun`` in tests: the
    sweep's own (:func:`megalm.train.launchers.job_env`: this checkout first on PYTHONPATH, the
    venv's bin on PATH, one OpenMP thread, a torch-extensions cache per venv, no rank variables)."""
    from megalm.train.launchers import job_env  # imports megalm.train: only when a test launches

    env = job_env(ROOT)
    # Launched runs take their real kernel path: compiled Triton on CUDA, never an
    # interpreter a kernel test scoped to itself (tests/kernels/conftest.py).
    env.pop("TRITON_INTERPRET", None)
    return env


def run_checkout(
    cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None, merge: bool = False
) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the checkout root with :func:`subprocess_env` (or ``env``) and wait.

    Output is captured as text, stderr into ``stdout`` with ``merge``; ``timeout`` is in
    seconds on an ordinary machine (:func:`scaled_timeout`).
    """
    err = subprocess.STDOUT if merge else subprocess.PIPE
    return subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        cwd=ROOT,
        env=subprocess_env() if env is None else env,
        timeout=scaled_timeout(timeout),
    )


TIMEOUT_FACTOR_ENV = "MEGALM_TEST_TIMEOUT_FACTOR"


def timeout_factor() -> float:
    """``MEGALM_TEST_TIMEOUT_FACTOR`` (default 1): how much slower than usual this machine may be."""
    raw = os.environ.get(TIMEOUT_FACTOR_ENV, "1")
    try:
        factor = float(raw)
    except ValueError:
        factor = 0.0
    if not factor > 0:
        raise pytest.UsageError(f"{TIMEOUT_FACTOR_ENV}={raw!r} must be a number > 0, e.g. 2")
    return factor


def scaled_timeout(seconds: float) -> float:
    """A timeout of ``seconds`` on an ordinary machine, scaled by :func:`timeout_factor`."""
    return seconds * timeout_factor()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="regenerate tests/golden/*.json from single-process runs first and print the diff",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Build DeepSpeed's CPU comm op once, before any test starts ranks: ranks that find it
    missing build it concurrently behind a lock, and a test killed mid-build would leave
    that lock for every later test to wait on (megalm/train/ds_ops.py)."""
    env = subprocess_env() | {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    cmd = [PYTHON, "-c", "from megalm.train.ds_ops import build_comm_op; print(build_comm_op())"]
    proc = run_checkout(cmd, 900, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def pytest_configure(config: pytest.Config) -> None:
    """Scale pytest-timeout's per-test limit (the ini ``timeout``) by the timeout factor."""
    if config.pluginmanager.hasplugin("timeout") and config.getoption("timeout", None) is None:
        ini = config.getini("timeout")
        if ini:
            config.option.timeout = float(ini) * timeout_factor()


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


@pytest.fixture(scope="session")
def golden_data(tmp_path_factory) -> Path:
    """Shards (with ``tokenizer.json``) of the fixed corpus: the data of the golden curves."""
    from tests.golden import build_golden_data

    return build_golden_data(tmp_path_factory.mktemp("golden-data"))


@pytest.fixture(scope="session")
def golden_runs(golden_data, tmp_path_factory, request) -> Callable[[str], Path]:
    """``golden_runs(family)``: run directory of that family's single-process golden run
    (``python launch/pretrain.py``, made once per session, on first use). With
    ``--update-golden`` each run rewrites its golden file and the diff is printed."""
    from tests.golden.update import run_golden, write_golden

    runs: dict[str, Path] = {}
    update = request.config.getoption("--update-golden")

    def get(family: str) -> Path:
        if family not in runs:
            runs[family] = run_golden(tmp_path_factory.mktemp(f"golden-{family}"), golden_data, family)
            if update:
                _echo(request.config, write_golden(runs[family], family))
        return runs[family]

    return get


@pytest.fixture(scope="session", autouse=True)
def _update_golden(request) -> None:
    """``--update-golden``: regenerate every golden file before any test compares with one."""
    if request.config.getoption("--update-golden"):
        from tests.golden import FAMILIES

        get = request.getfixturevalue("golden_runs")
        for family in FAMILIES:
            get(family)


def _echo(config: pytest.Config, text: str) -> None:
    """Print past pytest's output capture (the golden diff is for the person running it)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + text, flush=True)


# configs/tiny.yaml made a seconds-long run: the shape and schedule of every test run (the
# golden runs add their own keys, tests/golden/__init__.py:GOLDEN_CONFIG).
TINY: dict[str, object] = {
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


def tiny_overrides(run_dir: Path, data_dir: Path, **extra: object) -> list[str]:
    """Overrides that make configs/tiny.yaml a seconds-long run on the test shards."""
    base = {"run.dir": run_dir, "data.dir": data_dir, **TINY, **extra}
    return [f"{k}={v}" for k, v in base.items()]
