"""One cell of the launcher x layout matrix: launch ``launch/pretrain.py`` as users do, then check
its per-step losses and gradient norms against the golden llama curve (tests/golden), whose
first 10 steps a cell runs on the golden data (the ``golden_data`` fixture).

Shared by tests/test_launch_matrix.py, tests/test_multinode.py and tests/test_slurm_matrix.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from megalm.train.launchers import launch_command
from tests.conftest import ROOT, run_checkout
from tests.golden import assert_matches_golden, golden_run_overrides, load_golden

SCRIPT = str(ROOT / "launch" / "pretrain.py")
CONFIG = str(ROOT / "configs" / "tiny.yaml")
# The golden run's first 10 steps (its grad_clip is below the gradient norm, so clipping is
# active in every step and a wrong norm under some layout changes its losses too).
CELL = {"training.max_steps": 10, "training.sample_tokens": 0}
STEPS = range(1, 11)
LAYOUTS = {
    "tp2": {"parallel.tp": 2},
    "pp2-zero1": {"parallel.pp": 2, "zero.stage": 1},
    "pp2-zero0": {"parallel.pp": 2},
    "tp2-pp2": {"parallel.tp": 2, "parallel.pp": 2, "training.micro_batch": 1},
}


def cell_args(run_dir: Path, golden_data: Path, **layout: object) -> list[str]:
    """``--config tiny.yaml`` and the overrides of one cell: the golden llama run plus ``layout``."""
    return ["--config", CONFIG, *golden_run_overrides(run_dir, golden_data, **{**CELL, **layout})]


def launcher_command(launcher: str, nproc: int) -> list[str]:
    """The command that starts ``nproc`` ranks of ``launch/pretrain.py`` on this machine (the
    sweep's own :func:`megalm.train.launchers.launch_command`)."""
    return launch_command(launcher, nproc, [SCRIPT])


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; stdout and stderr merged into ``stdout``."""
    return run_checkout(cmd, timeout, env, merge=True)


def metrics(run_dir: Path) -> dict[int, dict]:
    """``{step: record}`` of the training records in ``run_dir/metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@dataclass(frozen=True)
class Agreement:
    """Worst per-step differences of a run from the golden curve."""

    loss_rel: float
    norm_rel: float
    norm_abs: float

    def __str__(self) -> str:
        return f"loss rel {self.loss_rel:.1e}, grad norm rel {self.norm_rel:.1e} (abs {self.norm_abs:.1e})"


def assert_cell_matches_golden(name: str, run_dir: Path, log: str = "") -> Agreement:
    """The golden llama curve's steps 1-10 (losses within 1e-5, grad norms within 1e-4 relative,
    same config, data and versions: :func:`tests.golden.assert_matches_golden`); prints the
    worst differences."""
    got = metrics(run_dir)
    assert sorted(got) == list(STEPS), log[-3000:]
    missing = [s for s in got if got[s].get("grad_norm") is None]
    assert not missing, f"{name}: grad_norm is null at steps {missing}"
    ref = {r["step"]: r for r in load_golden("llama")["steps"]}
    loss = max(abs(got[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in STEPS)
    norm_abs = max(abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) for s in STEPS)
    norm = max(abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) / ref[s]["grad_norm"] for s in STEPS)
    result = Agreement(loss, norm, norm_abs)
    print(f"cell {name}: {result}")
    assert_matches_golden(run_dir, "llama", STEPS)
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
