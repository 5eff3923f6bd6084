"""Launch ``launch/pretrain.py`` the way users do (python, deepspeed, torchrun, mpirun), on CPU."""

from __future__ import annotations

import socket
import subprocess

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
    port = str(free_port())
    script = [str(ROOT / "launch" / "pretrain.py"), "--config", CONFIG, *overrides]
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
