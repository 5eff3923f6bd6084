"""Rank discovery: each launcher's environment -> rank, world, local rank, master.

The environments below are the variables the real launchers set (recorded from
torchrun, ``deepspeed``'s launch.py, Slurm 22.05 ``srun`` and MPICH 5 ``mpiexec``);
``test_mpiexec_discovery_through_mpi4py`` and tests/test_slurm.py run the real ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megalm.train.dist import LaunchError, detect_launcher, discover_ranks, first_host, tasks_on_node
from tests.conftest import PYTHON, VENV_BIN, run_checkout

TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
}
DEEPSPEED = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "LOCAL_SIZE": "2",
}
SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "7",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "7",
    "SLURM_STEP_TASKS_PER_NODE": "4,3",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}
SBATCH_SHELL = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({}, "python"),
        (TORCHRUN, "torchrun"),
        (TORCHRUN | SRUN, "torchrun"),  # torchrun started by srun: the innermost launcher wins
        (DEEPSPEED, "deepspeed"),
        (SRUN, "srun"),
        (SBATCH_SHELL, "python"),  # the batch script's own shell is not an srun step
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "mpirun"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, "mpirun"),
        (SRUN | {"PMI_RANK": "5"}, "srun"),  # srun --mpi=pmi2 sets PMI_RANK to the same task
        (SRUN | {"PMI_RANK": "0"}, "mpirun"),  # mpirun's ranks inside one srun task (hydra proxy)
        ({"RANK": "0", "WORLD_SIZE": "1"}, "env"),
    ],
)
def test_detect_launcher(env, launcher):
    assert detect_launcher(env) == launcher


def test_torchrun_and_deepspeed_read_the_env_variables():
    r = discover_ranks(TORCHRUN)
    assert (r.launcher, r.rank, r.world_size, r.local_rank, r.local_world_size) == ("torchrun", 1, 4, 1, 2)
    assert (r.master_addr, r.master_port) == ("10.0.0.1", 29500)
    d = discover_ranks(DEEPSPEED)
    assert (d.launcher, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("deepspeed", 3, 4, 1, 2)
    assert d.as_env()["LOCAL_WORLD_SIZE"] == "2"


def test_srun_reads_slurm_variables_and_derives_master():
    r = discover_ranks(SRUN)
    assert (r.launcher, r.rank, r.world_size, r.local_rank, r.local_world_size) == ("srun", 5, 7, 1, 3)
    assert r.master_addr == "gpu007"
    assert r.master_port == 10000 + 4242
    assert discover_ranks(SRUN | {"MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_addr == "head"


def test_python_is_a_world_of_one_on_a_free_port():
    r = discover_ranks({})
    assert (r.rank, r.world_size, r.local_rank, r.local_world_size, r.master_addr) == (
        0,
        1,
        0,
        1,
        "127.0.0.1",
    )
    assert r.master_port > 0
    assert "launcher python" in r.describe()


@pytest.mark.parametrize(
    "env, message",
    [
        (SRUN | {"RANK": "0", "WORLD_SIZE": "1"}, "contradict srun's SLURM_PROCID=5"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 of world 2"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT are not set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"CROSS_RANK": "0", "LOCAL_SIZE": "2"}, "RANK is not"),
        (SRUN | {"SLURM_STEP_TASKS_PER_NODE": "4"}, "SLURM_NODEID=1"),
    ],
)
def test_contradictory_or_partial_environment_is_a_clear_error(env, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        discover_ranks(env)


def test_slurm_list_helpers():
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert first_host("node[010-012,020],login1") == "node010"
    assert first_host("vm") == "vm"


# Each rank writes its own record to ``<dir>/<pid>.json`` (the directory is argv[1]): a launcher
# that merges the ranks' stdout (mpiexec, srun) can interleave or join their lines, and once did
# (two records on one line in a full CI run); separate files cannot interleave.
DISCOVER = (
    "import json, os, sys; from megalm.train.dist import discover_ranks; "
    "open(os.path.join(sys.argv[1], f'{os.getpid()}.json'), 'w').write(json.dumps(discover_ranks().__dict__))"
)


def read_rank_records(out_dir: Path, expected: int) -> list[dict]:
    """The records :data:`DISCOVER` wrote into ``out_dir``, sorted by rank."""
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == expected, f"{len(files)} rank records in {out_dir}, expected {expected}"
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])


@pytest.mark.skipif(not (VENV_BIN / "mpiexec").exists(), reason="no mpiexec: pip install mpich mpi4py")
def test_mpiexec_discovery_through_mpi4py(tmp_path):
    cmd = [str(VENV_BIN / "mpiexec"), "-n", "2", PYTHON, "-c", DISCOVER, str(tmp_path)]
    proc = run_checkout(cmd, 120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ranks = read_rank_records(tmp_path, 2)
    assert [(r["launcher"], r["rank"], r["world_size"], r["local_rank"]) for r in ranks] == [
        ("mpirun", 0, 2, 0),
        ("mpirun", 1, 2, 1),
    ]
    assert ranks[0]["master_port"] == ranks[1]["master_port"] > 0  # rank 0's choice, broadcast
    assert ranks[0]["master_addr"] == ranks[1]["master_addr"]
