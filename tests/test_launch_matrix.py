"""Every launcher with every layout: torchrun, deepspeed and mpirun (mpich + mpi4py) x {tp 2,
pp 2 with ZeRO-1} on 2 ranks give the golden single-process losses (<= 1e-5 relative) and gradient
norms (<= 1e-4 relative), and a world size that does not fit the layout is one ``error:`` line
naming the launcher's variables. srun's cells are in tests/test_slurm_matrix.py, the
multi-node runs in tests/test_multinode.py.
"""

from __future__ import annotations

import pytest

from tests.conftest import VENV_BIN
from tests.host_reads import assert_host_reads, host_read_env, reads_dir
from tests.launch_cells import (
    LAYOUTS,
    STEPS,
    assert_cell_matches_golden,
    assert_one_error_line,
    cell_args,
    dist_lines,
    launcher_command,
    run,
)

pytestmark = pytest.mark.slow
LAUNCHERS = ["torchrun", "deepspeed", "mpirun"]
needs_mpi = pytest.mark.skipif(
    not (VENV_BIN / "mpiexec").exists(), reason="no mpiexec: pip install mpich mpi4py"
)


def _marks(launcher: str) -> list:
    return [needs_mpi] if launcher == "mpirun" else []


@pytest.mark.parametrize(
    ("launcher", "layout"),
    [pytest.param(lau, lay, marks=_marks(lau)) for lau in LAUNCHERS for lay in ("tp2", "pp2-zero1")],
)
def test_two_ranks_equal_single_process(golden_data, tmp_path, launcher, layout):
    """...and every rank reads the host once per step and at most once per log record."""
    run_dir = tmp_path / "run"
    env = host_read_env(reads_dir(run_dir))
    proc = run([*launcher_command(launcher, 2), *cell_args(run_dir, golden_data, **LAYOUTS[layout])], env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert dist_lines(proc.stdout) == [(launcher, 0, 2, 0, 2), (launcher, 1, 2, 1, 2)]
    assert_cell_matches_golden(f"{launcher} {layout}", run_dir, proc.stdout)
    assert_host_reads(reads_dir(run_dir), ranks=2, steps=len(STEPS), log_records=len(STEPS))


def test_pp2_zero0_reports_the_single_process_grad_norm(golden_data, tmp_path):
    """ZeRO-0 fp32 under PP: DeepSpeed's pipeline engine keeps no norm; megalm measures it (and
    clips with it) as the plain path does, so grad_norm is logged and equals one process."""
    proc = run([*launcher_command("torchrun", 2), *cell_args(tmp_path, golden_data, **LAYOUTS["pp2-zero0"])])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert_cell_matches_golden("torchrun pp2-zero0", tmp_path, proc.stdout)


@pytest.mark.parametrize(
    ("launcher", "names"),
    [
        ("torchrun", ["world size from torchrun: WORLD_SIZE=2"]),
        ("deepspeed", ["world size from deepspeed: WORLD_SIZE=2"]),
        pytest.param(
            "mpirun", ["world size from mpirun: MPI_COMM_WORLD size 2", "PMI_SIZE=2"], marks=needs_mpi
        ),
    ],
)
def test_wrong_world_size_is_one_error_line_naming_the_launcher_variables(
    golden_data, tmp_path, launcher, names
):
    proc = run([*launcher_command(launcher, 2), *cell_args(tmp_path, golden_data, **{"parallel.tp": 4})])
    assert proc.returncode != 0
    line = assert_one_error_line(proc.stdout, "tp(4) * pp(1) * dp(1) != world_size(2)", *names)
    assert line.endswith(")"), line  # nothing but the world-size problem
    assert not (tmp_path / "metrics.jsonl").exists()
