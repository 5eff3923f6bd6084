"""Launch ``launch/pretrain.py`` the way users do (python, deepspeed, torchrun, mpirun), on CPU."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from megalm.train.metrics import read_metrics
from tests.conftest import PYTHON, ROOT, VENV_BIN, scaled_timeout, subprocess_env

CONFIG = str(ROOT / "configs" / "tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    """:func:`subprocess_env` with CUDA hidden and DeepSpeed's CPU accelerator: distributed tests
    run on gloo/CPU even on a GPU machine (two ranks cannot share its one GPU, and the golden
    curves are CPU fp32 numbers). The ``deepspeed`` launcher rewrites ``CUDA_VISIBLE_DEVICES``
    for its ranks, so on a GPU machine its ranks still see the GPU (megalm has no device key)."""
    return subprocess_env() | {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def run_pretrain(
    overrides: list[str], launcher: str = "python", nproc: int = 1, cuda: bool = False
) -> subprocess.CompletedProcess:
    """Run ``launch/pretrain.py`` with ``configs/tiny.yaml`` plus ``overrides``, on CPU unless ``cuda``.

    A non-zero exit fails the test for the multi-process launchers; plain python
    returns the process so tests can check error exits. The timeout is 600 s times
    ``MEGALM_TEST_TIMEOUT_FACTOR``.
    """
    return run_script("pretrain.py", ["--config", CONFIG, *overrides], launcher, nproc, cuda)


def run_script(
    name: str, args: list[str], launcher: str = "python", nproc: int = 1, cuda: bool = False
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
    env = subprocess_env() if cuda else cpu_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=scaled_timeout(600))
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


def start_ranks(overrides: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks of launch/pretrain.py, wired by hand like any env:// launcher (no
    launcher that kills the survivors, so each rank's own exit code can be checked)."""
    port, procs = free_port(), []
    for rank in range(world):
        env = cpu_env() | {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [PYTHON, str(ROOT / "launch" / "pretrain.py"), "--config", CONFIG, *overrides]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, float]]:
    """(exit code, output, seconds until exit) per rank; kills what outlives ``timeout``."""
    t0, out = time.monotonic(), []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text, time.monotonic() - t0))
    return out
