"""srun with every layout, and multi-node Slurm jobs, on a real two-node Slurm cluster on localhost.

``launch/slurm/local_cluster.sh start DIR 2`` runs slurmctld and two slurmd daemons
(``slurmd -N megalm-n1``, ``-N megalm-n2``, one port each, ``NodeAddr=127.0.0.1``): Debian's
Slurm 22.05 is built with multiple-slurmd support, so this is a real two-node allocation
(``SLURM_NODEID`` 0 and 1, ``SLURM_STEP_NODELIST=megalm-n[1-2]``), not simulated variables.
The node names do not resolve, so the master address comes from the first node's NodeAddr.
One cluster serves the whole module; where it cannot start (not root, no apt-get) the tests
skip with the script's reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, VENV_BIN, subprocess_env
from tests.launch_cells import (
    LAYOUTS,
    SCRIPT,
    assert_cell_matches_golden,
    assert_one_error_line,
    cell_args,
    dist_lines,
    run,
)
from tests.launching import local_slurm_cluster
from tests.test_multinode import HOSTLISTS

pytestmark = pytest.mark.slow
SBATCH = ROOT / "launch" / "slurm"
NODES = "megalm-n[1-2]"
# The scripts ask for 8 GPUs and 12 CPUs per node; each local node has 2 CPUs and no GPU.
LOCAL = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of a started two-node cluster (SLURM_CONF and the venv's python)."""
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm2"), 2, subprocess_env()) as env:
        yield env


def srun(nodes: int, ntasks: int) -> list[str]:
    return ["srun", f"--nodes={nodes}", f"--ntasks={ntasks}", "--cpus-per-task=1", "--kill-on-bad-exit=1"]


def sbatch(env: dict[str, str], out: Path, *args: str) -> str:
    """Submit; the job id."""
    proc = run(["sbatch", "--parsable", *LOCAL, f"--output={out}", *args], env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout.strip().split(";")[0]


def wait_done(env: dict[str, str], job: str, out: Path, timeout: float = 1200) -> None:
    """Wait until ``job`` ends; fail unless it COMPLETED."""
    deadline = time.monotonic() + timeout
    while True:
        info = run(["scontrol", "show", "job", "-o", job], env=env, timeout=60).stdout
        state = info.split("JobState=")[1].split()[0]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout}s"
        time.sleep(1)
    assert state == "COMPLETED", f"job {job}: {state}\n{out.read_text()[-3000:] if out.exists() else ''}"


def test_hostlists_match_live_scontrol(slurm):
    for nodelist, hosts in HOSTLISTS.items():
        assert run(["scontrol", "show", "hostnames", nodelist], env=slurm).stdout.split() == hosts


@pytest.mark.parametrize("layout", ["tp2", "pp2-zero1"])
def test_srun_two_ranks_equal_single_process(slurm, golden_data, tmp_path, layout):
    proc = run([*srun(1, 2), PYTHON, SCRIPT, *cell_args(tmp_path, golden_data, **LAYOUTS[layout])], env=slurm)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert dist_lines(proc.stdout) == [("srun", 0, 2, 0, 2), ("srun", 1, 2, 1, 2)]
    assert_cell_matches_golden(f"srun {layout}", tmp_path, proc.stdout)


def test_srun_tp2_pp2_on_two_nodes_equals_single_process(slurm, golden_data, tmp_path):
    """4 ranks, 2 per node: each pipeline stage's TP pair on one node, the stages on different
    nodes; ZeRO-0 fp32, so the gradient norm is megalm's own over the pipe x tensor group."""
    proc = run(
        [*srun(2, 4), PYTHON, SCRIPT, *cell_args(tmp_path, golden_data, **LAYOUTS["tp2-pp2"])], env=slurm
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert dist_lines(proc.stdout) == [("srun", r, 4, r % 2, 2) for r in range(4)]
    assert proc.stdout.count("master 127.0.0.1:") == 4  # megalm-n1's NodeAddr
    assert_cell_matches_golden("srun 2 nodes tp2 x pp2", tmp_path, proc.stdout)


def test_pretrain_sbatch_two_nodes_tp2_dp2_equals_single_process(slurm, golden_data, tmp_path):
    out = tmp_path / "slurm.out"
    job = sbatch(
        slurm,
        out,
        "--nodes=2",
        "--ntasks-per-node=2",
        str(SBATCH / "pretrain.sbatch"),
        *cell_args(tmp_path / "run", golden_data, **LAYOUTS["tp2"]),
    )
    wait_done(slurm, job, out)
    log = out.read_text()
    assert f"megalm job {job} on {NODES}" in log and "srun exited with 0" in log
    assert dist_lines(log) == [("srun", r, 4, r % 2, 2) for r in range(4)]
    assert "tp 2 x pp 1 x dp 2" in log
    assert_cell_matches_golden("sbatch 2 nodes tp2 x dp2", tmp_path / "run", log)


def test_deepspeed_hostfile_through_slurm_equals_single_process(slurm, golden_data, tmp_path):
    """In a two-node allocation: make_hostfile.sh writes one line per node, and
    ``deepspeed --hostfile --launcher slurm`` starts the ranks with ``srun`` (no ssh/pdsh);
    megalm reads them from Slurm (tp 2 across the two nodes)."""
    hostfile = tmp_path / "hostfile"
    args = " ".join(cell_args(tmp_path / "run", golden_data, **LAYOUTS["tp2"]))
    script = (
        f"bash {SBATCH / 'make_hostfile.sh'} {hostfile} 1 && "
        f"{VENV_BIN / 'deepspeed'} --hostfile {hostfile} --launcher slurm --no_ssh_check "
        f"--master_addr 127.0.0.1 {SCRIPT} {args}"
    )
    proc = run(
        ["salloc", "--nodes=2", "--ntasks-per-node=1", *LOCAL, "bash", "-c", script], env=slurm, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert hostfile.read_text() == "megalm-n1 slots=1\nmegalm-n2 slots=1\n"
    assert dist_lines(proc.stdout) == [("srun", 0, 2, 0, 1), ("srun", 1, 2, 0, 1)]
    assert_cell_matches_golden("deepspeed --hostfile (slurm) tp2", tmp_path / "run", proc.stdout)


def test_srun_wrong_world_size_is_one_error_line(slurm, golden_data, tmp_path):
    proc = run(
        [*srun(1, 2), PYTHON, SCRIPT, *cell_args(tmp_path, golden_data, **{"parallel.tp": 4})], env=slurm
    )
    assert proc.returncode != 0
    assert_one_error_line(proc.stdout, "world_size(2)", "world size from srun: SLURM_STEP_NUM_TASKS=2")


def test_benchmark_sweep_with_tp2_under_slurm_measures_both(slurm, golden_data, tmp_path):
    out = tmp_path / "slurm.out"
    model = [a for a in cell_args(tmp_path, golden_data) if a.startswith(("model.", "data.dir="))]
    job = sbatch(
        slurm,
        out,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(SBATCH / "benchmark.sbatch"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--out",
        str(tmp_path / "bench"),
        "--sweep",
        "parallel.tp=1,2",
        "--steps",
        "2",
        "--warmup",
        "2",
        "--set",
        *model,
    )
    wait_done(slurm, job, out)
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())
    got = [(str(r["parallel.tp"]), r["status"], r.get("launcher"), r.get("dp")) for r in rows]
    assert got == [("1", "ok", "srun", 2), ("2", "ok", "srun", 1)], out.read_text()[-3000:]
    assert all(r["tokens_per_s_per_device"] > 0 for r in rows)
