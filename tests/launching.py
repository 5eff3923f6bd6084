"""Launch ``launch/pretrain.py`` the way users do (python, deepspeed, torchrun, mpirun), on CPU,
and a real Slurm cluster on localhost for the srun/sbatch tests (:func:`local_slurm_cluster`)."""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from megalm.train.launchers import free_port, launch_command
from megalm.train.metrics import read_metrics
from tests.conftest import PYTHON, ROOT, run_checkout, scaled_timeout, subprocess_env

CONFIG = str(ROOT / "configs" / "tiny.yaml")
SLURM_CLUSTER = ROOT / "launch" / "slurm" / "local_cluster.sh"


def cpu_env() -> dict[str, str]:
    """:func:`subprocess_env` with CUDA hidden and DeepSpeed's CPU accelerator: distributed tests
    run on gloo/CPU even on a GPU machine (two ranks cannot share its one GPU, and the golden
    curves are CPU fp32 numbers). The ``deepspeed`` launcher rewrites ``CUDA_VISIBLE_DEVICES``
    for its ranks, so on a GPU machine its ranks still see the GPU (megalm has no device key)."""
    return subprocess_env() | {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def run_pretrain(overrides: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``launch/pretrain.py`` with ``configs/tiny.yaml`` plus ``overrides``; the other
    arguments (launcher, nproc, cuda, env) as :func:`run_script`'s.

    A non-zero exit fails the test for the multi-process launchers; plain python
    returns the process so tests can check error exits. The timeout is 600 s times
    ``MEGALM_TEST_TIMEOUT_FACTOR``.
    """
    return run_script("pretrain.py", ["--config", CONFIG, *overrides], *args, **kwargs)


def run_script(
    name: str,
    args: list[str],
    launcher: str = "python",
    nproc: int = 1,
    cuda: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``launch/<name>`` with ``args`` under ``launcher`` with ``nproc`` ranks, on CPU unless
    ``cuda``; ``env`` replaces the default environment (:func:`cpu_env`)."""
    cmd = launch_command(launcher, nproc, [str(ROOT / "launch" / name), *args])
    env = env or (subprocess_env() if cuda else cpu_env())
    proc = run_checkout(cmd, 600, env)
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


def _free_ports(n: int) -> int:
    """A port p with p + 1 ... p + n - 1 free too (slurmd daemon i listens on p + i - 1)."""
    while True:
        port = free_port()
        with contextlib.ExitStack() as held:
            try:
                for i in range(1, n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port + i))
                return port
            except OSError:
                continue


@contextlib.contextmanager
def local_slurm_cluster(
    state: Path, nodes: int, job_env: dict[str, str], why: str = ""
) -> Iterator[dict[str, str]]:
    """A real Slurm cluster of ``nodes`` slurmd daemons on localhost, state under ``state``.

    ``launch/slurm/local_cluster.sh`` starts it (installing slurm-wlm and munge where
    missing) on free ports, with job ids far from another local cluster's (job ids derive
    MASTER_PORT); it is stopped at exit. Skips with the script's reason where it cannot
    run (exit 3); ``why`` is added to the skip and failure messages. Yields ``job_env``
    plus what jobs need: SLURM_CONF, the venv's python and the checkout.
    """
    note = f" ({why})" if why else ""
    ports = {
        "SLURMCTLD_PORT": str(free_port()),
        "SLURMD_PORT": str(_free_ports(nodes)),
        "SLURM_FIRST_JOB_ID": str(random.randrange(100_000, 900_000)),
    }
    limit = scaled_timeout(900)
    try:
        proc = subprocess.run(
            ["bash", str(SLURM_CLUSTER), "start", str(state), str(nodes)],
            capture_output=True,
            text=True,
            timeout=limit,
            env=subprocess_env() | ports,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch/slurm/local_cluster.sh start took more than {limit:.0f}s{note}")
    if proc.returncode == 3:
        pytest.skip(f"no local Slurm cluster: {proc.stderr.strip()}{note}")
    assert proc.returncode == 0, f"local Slurm cluster did not start{note}:\n{proc.stdout}\n{proc.stderr}"
    try:
        yield job_env | {
            "SLURM_CONF": str(state / "slurm.conf"),
            "MEGALM_PYTHON": PYTHON,
            "MEGALM_DIR": str(ROOT),
            "OMP_NUM_THREADS": "1",
        }
    finally:
        subprocess.run(
            ["bash", str(SLURM_CLUSTER), "stop", str(state)], capture_output=True, timeout=scaled_timeout(120)
        )
