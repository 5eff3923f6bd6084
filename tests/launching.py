"""Launch ``launch/pretrain.py`` the way users do (python, deepspeed, torchrun) and read its metrics."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from megalm.train.metrics import read_metrics
from tests.conftest import PYTHON, ROOT, VENV_BIN, subprocess_env

CONFIG = str(ROOT / "configs" / "tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pretrain(
    overrides: list[str], launcher: str = "python", nproc: int = 1
) -> subprocess.CompletedProcess:
    """Run ``launch/pretrain.py`` with ``configs/tiny.yaml`` plus ``overrides``.

    A non-zero exit fails the test for the multi-process launchers; plain python
    returns the process so tests can check error exits.
    """
    return run_script("pretrain.py", ["--config", CONFIG, *overrides], launcher, nproc)


def run_script(
    name: str, args: list[str], launcher: str = "python", nproc: int = 1
) -> subprocess.CompletedProcess:
    """Run ``launch/<name>`` with ``args`` under ``launcher`` (as :func:`run_pretrain`)."""
    port = str(free_port())
    script = [str(ROOT / "launch" / name), *args]
    if launcher == "python":
        cmd = [PYTHON, *script]
    elif launcher == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, *script]
    elif launcher == "mpirun":
        cmd = [str(VENV_BIN / "mpiexec"), "-n", str(nproc), PYTHON, *script]
    else:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0 or launcher == "python", proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def step_losses(run_dir: Path) -> dict[int, float]:
    """``{step: loss}`` from a run's ``metrics.jsonl``."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def assert_losses_equal(a: dict[int, float], b: dict[int, float], steps: range, rel: float = 1e-5) -> None:
    """Per-step losses agree within ``rel`` (relative); prints the worst difference."""
    assert set(steps) <= a.keys() and set(steps) <= b.keys()
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    print(f"max relative loss difference over steps {steps.start}-{steps.stop - 1}: {worst:.2e}")
    assert worst <= rel, f"max relative loss difference {worst:.2e} > {rel:.0e}"
