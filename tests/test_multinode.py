"""Multi-node launches on one machine, so the inter-node paths run in CI: two torchrun agents
(``--nnodes 2``, c10d rendezvous on localhost) and ``deepspeed --hostfile`` with two hosts
through its MPICH backend (no ssh/pdsh: hydra starts local hosts itself) train tp 2 x dp 2 /
tp 2 equal to one process; Slurm node lists give the first host as ``scontrol`` does. The
two-node Slurm job is in tests/test_slurm_matrix.py.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from megalm.train.dist import LaunchError, expand_hostlist, first_host, reachable_address
from megalm.train.launchers import free_port
from tests.conftest import ROOT, VENV_BIN, subprocess_env
from tests.launch_cells import (
    LAYOUTS,
    SCRIPT,
    assert_cell_matches_golden,
    cell_args,
    dist_lines,
    run,
)

HOSTLISTS = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "gpu[007-010,012],cpu1": ["gpu007", "gpu008", "gpu009", "gpu010", "gpu012", "cpu1"],
    "a-b[1-2]": ["a-b1", "a-b2"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "pre[1-2]-[5-6]": ["pre1-5", "pre1-6", "pre2-5", "pre2-6"],
    "node[7,01-02] login": ["node7", "node01", "node02", "login"],
    "x[9-11],y[01-2],z[1-02]": ["x9", "x10", "x11", "y01", "y02", "z1", "z2"],
    "vm": ["vm"],
    "b,,a,b": ["b", "a", "b"],
}


@pytest.mark.parametrize("nodelist", HOSTLISTS)
def test_hostlist_expands_as_scontrol_does(nodelist):
    """Expected lists recorded from Slurm 22.05 ``scontrol show hostnames`` (tests/test_slurm_matrix.py
    checks them against the live one)."""
    assert expand_hostlist(nodelist) == HOSTLISTS[nodelist]
    assert first_host(nodelist) == HOSTLISTS[nodelist][0]


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [
        ("a[3-1]", "bad range '3-1'"),
        ("a[x]", "bad range 'x'"),
        ("a[1-2]]", "unbalanced brackets"),
        ("a[1-2", "unbalanced brackets"),
        ("a[[1]]", "unbalanced brackets"),
        (" , ", "names no host"),
    ],
)
def test_bad_hostlist_is_a_launch_error(nodelist, message):
    with pytest.raises(LaunchError, match=message):
        expand_hostlist(nodelist)


def test_master_address_is_the_name_when_it_resolves_else_kept(monkeypatch):
    """A resolvable name is used as it is; an unknown one without ``scontrol`` is kept (the
    NodeAddr path is exercised by the two-node cluster in tests/test_slurm_matrix.py)."""
    assert reachable_address("localhost") == "localhost"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert reachable_address("megalm-no-such-host.invalid") == "megalm-no-such-host.invalid"


@pytest.mark.slow
def test_two_torchrun_agents_tp2_dp2_equal_single_process(golden_data, tmp_path):
    """Two ``torchrun --nnodes 2 --node_rank i`` agents of 2 ranks each meet at a c10d rendezvous
    on localhost: 4 ranks, tp 2 x dp 2, each agent's ranks local 0/2 and 1/2."""
    port = free_port()
    args = cell_args(tmp_path, golden_data, **LAYOUTS["tp2"])
    agents = [
        subprocess.Popen(
            [
                str(VENV_BIN / "torchrun"),
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=2",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=megalm-test",
                SCRIPT,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=subprocess_env(),
        )
        for node in (0, 1)
    ]
    logs = []
    for agent in agents:
        out, _ = agent.communicate(timeout=900)
        logs.append(out)
        assert agent.returncode == 0, out[-3000:]
    ranks = [dist_lines(log) for log in logs]
    assert [[(lau, world, local, lw) for lau, _, world, local, lw in r] for r in ranks] == [
        [("torchrun", 4, 0, 2), ("torchrun", 4, 1, 2)]
    ] * 2
    assert sorted(rank for r in ranks for _, rank, *_ in r) == [0, 1, 2, 3]
    assert "tp 2 x pp 1 x dp 2" in "".join(logs)
    assert_cell_matches_golden("torchrun 2 agents tp2 x dp2", tmp_path, "".join(logs))


@pytest.mark.slow
@pytest.mark.skipif(not (VENV_BIN / "mpiexec").exists(), reason="no mpiexec: pip install mpich mpi4py")
def test_deepspeed_hostfile_through_mpich_equals_single_process(golden_data, tmp_path):
    """``deepspeed --hostfile`` with two hosts (localhost and this machine's name, one slot each)
    and ``--launcher mpich``: DeepSpeed runs ``mpirun -hosts localhost,<name>`` (hydra forks
    local hosts, no ssh) and exports RANK/WORLD_SIZE/LOCAL_SIZE; tp 2 spans the two hosts."""
    hostname = socket.gethostname()
    assert hostname != "localhost"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"localhost slots=1\n{hostname} slots=1\n")
    proc = run(
        [
            str(VENV_BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--launcher",
            "mpich",
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            SCRIPT,
            *cell_args(tmp_path / "run", golden_data, **LAYOUTS["tp2"]),
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "mpirun -n 2 -ppn 1" in proc.stdout and f"-hosts localhost,{hostname}" in proc.stdout
    assert dist_lines(proc.stdout) == [("deepspeed", 0, 2, 0, 1), ("deepspeed", 1, 2, 0, 1)]
    assert_cell_matches_golden("deepspeed --hostfile (mpich) tp2", tmp_path / "run", proc.stdout)
