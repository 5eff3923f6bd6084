"""One cell of the launcher x layout matrix: launch ``launch/pretrain.py`` as users do, then check
its per-step losses and gradient norms against one single-process run of the same config.

Shared by tests/test_launch_matrix.py, tests/test_multinode.py and tests/test_slurm_matrix.py.
The single-process reference runs once per session (cached here, since those modules cannot
share a fixture without tests/conftest.py); a cell is one multi-process run of 10 steps.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import PYTHON, ROOT, VENV_BIN, subprocess_env, tiny_overrides

SCRIPT = str(ROOT / "launch" / "pretrain.py")
CONFIG = str(ROOT / "configs" / "tiny.yaml")
# 10 steps of the tiny test model; grad_clip below the gradient norm (about 0.7), so clipping
# is active in every step and a wrong norm under some layout changes its losses too.
CELL = {"training.max_steps": 10, "optim.grad_clip": 0.3, "training.sample_tokens": 0}
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4
LAYOUTS = {
    "tp2": {"parallel.tp": 2},
    "pp2-zero1": {"parallel.pp": 2, "zero.stage": 1},
    "pp2-zero0": {"parallel.pp": 2},
    "tp2-pp2": {"parallel.tp": 2, "parallel.pp": 2, "training.micro_batch": 1},
}
_REFERENCE: dict[Path, dict[int, dict]] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell_args(run_dir: Path, shards_dir: Path, **layout: object) -> list[str]:
    """``--config tiny.yaml`` and the overrides of one cell (the reference has no ``layout``)."""
    return ["--config", CONFIG, *tiny_overrides(run_dir, shards_dir, **{**CELL, **layout})]


def launcher_command(launcher: str, nproc: int) -> list[str]:
    """The command that starts ``nproc`` ranks of ``launch/pretrain.py`` on this machine."""
    port = str(free_port())
    return {
        "python": [PYTHON, SCRIPT],
        "torchrun": [
            str(VENV_BIN / "torchrun"),
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            SCRIPT,
        ],
        "deepspeed": [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, SCRIPT],
        "mpirun": [str(VENV_BIN / "mpiexec"), "-n", str(nproc), PYTHON, SCRIPT],
        "srun": ["srun", "-n", str(nproc), "--cpus-per-task=1", "--kill-on-bad-exit=1", PYTHON, SCRIPT],
    }[launcher]


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; stdout and stderr merged into ``stdout``."""
    return subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env or subprocess_env(),
        timeout=timeout,
    )


def metrics(run_dir: Path) -> dict[int, dict]:
    """``{step: record}`` of the training records in ``run_dir/metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def reference(shards_dir: Path, root: Path) -> dict[int, dict]:
    """The single-process run's records, run once per session (under ``root``)."""
    if shards_dir not in _REFERENCE:
        run_dir = root / "reference"
        proc = run([PYTHON, SCRIPT, *cell_args(run_dir, shards_dir)])
        assert proc.returncode == 0, proc.stdout[-3000:]
        _REFERENCE[shards_dir] = metrics(run_dir)
    return _REFERENCE[shards_dir]


@dataclass(frozen=True)
class Agreement:
    """Worst per-step differences of a run from the reference."""

    loss_rel: float
    norm_rel: float
    norm_abs: float

    def __str__(self) -> str:
        return f"loss rel {self.loss_rel:.1e}, grad norm rel {self.norm_rel:.1e} (abs {self.norm_abs:.1e})"


def assert_matches_reference(name: str, ref: dict[int, dict], run_dir: Path, log: str = "") -> Agreement:
    """Every step's loss within 1e-5 relative and grad norm within 1e-4 relative of ``ref``."""
    got = metrics(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, CELL["training.max_steps"] + 1)), log[-3000:]
    missing = [s for s in got if got[s].get("grad_norm") is None]
    assert not missing, f"{name}: grad_norm is null at steps {missing}"
    loss = max(abs(got[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in ref)
    norm_abs = max(abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) for s in ref)
    norm = max(abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) / ref[s]["grad_norm"] for s in ref)
    result = Agreement(loss, norm, norm_abs)
    print(f"cell {name}: {result}")
    assert loss <= LOSS_RTOL, f"{name}: {result}"
    assert norm <= NORM_RTOL, f"{name}: {result}"
    return result


def dist_lines(log: str) -> list[tuple[str, int, int, int, int]]:
    """``(launcher, rank, world, local rank, local world)`` of every rank's ``dist |`` line."""
    pattern = r"dist   \| launcher (\w+) \| rank (\d+)/(\d+) \| local (\d+)/(\d+)"
    return sorted((m[0], *map(int, m[1:])) for m in re.findall(pattern, log))


def assert_one_error_line(log: str, *names: str) -> str:
    """The ranks' output holds one distinct ``error:`` line (each rank prints the same one), it
    names ``names``, and no traceback passes through megalm's code."""
    errors = {line.strip() for line in log.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, log[-3000:]
    (line,) = errors
    for name in names:
        assert name in line, line
    assert not re.search(r'File ".*(megalm|launch/pretrain\.py)', log), log[-3000:]
    return line
