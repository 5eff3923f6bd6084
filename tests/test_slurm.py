"""launch/slurm/ on a real one-node Slurm cluster started on localhost for this module.

This module changes the machine it runs on: ``launch/slurm/local_cluster.sh``
installs Debian's slurm-wlm + munge with apt-get when they are missing (as root)
and starts munged, slurmctld and slurmd (as root, state under a temporary
directory); the module's teardown stops the daemons, the packages stay. Where that
is impossible the tests skip with the script's reason, and the skip (or failure)
message says what the fixture would have done. The jobs train the golden config
and are compared with the golden curve (tests/golden).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megalm.train.checkpoint import find_latest
from tests.conftest import PYTHON, ROOT, scaled_timeout
from tests.golden import assert_matches_golden, golden_run_overrides
from tests.launching import cpu_env, local_slurm_cluster
from tests.test_launch_discovery import DISCOVER, read_rank_records
from tests.test_preempt import EXIT_PREEMPTED, last_step

pytestmark = pytest.mark.slow
SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
# The script asks for 2 nodes x 8 GPUs x 12 CPUs; the local node has neither.
LOCAL = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
JOB_STEPS = 30  # past the golden curve's 20, so both jobs are compared with all of it
CHANGES_THE_MACHINE = (
    "this fixture installs slurm-wlm and munge with apt-get (as root) when they are missing and "
    "starts munged, slurmctld and slurmd on this machine (stopped at teardown)"
)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of a started one-node cluster (jobs on CPU)."""
    with local_slurm_cluster(tmp_path_factory.mktemp("slurm"), 1, cpu_env(), CHANGES_THE_MACHINE) as env:
        yield env


def slurm(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run a Slurm client command; ``timeout`` is scaled by the timeout factor."""
    proc = subprocess.run(
        list(args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=scaled_timeout(timeout)
    )
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def job_field(env: dict[str, str], job: str, key: str) -> str:
    out = slurm(env, "scontrol", "show", "job", job)
    return next(w.split("=", 1)[1] for w in out.split() if w.startswith(key + "="))


def submit(env: dict[str, str], run_dir: Path, overrides: list[str]) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = slurm(
        env,
        "sbatch",
        "--parsable",
        *LOCAL,
        f"--output={run_dir}/slurm.out",
        str(SBATCH),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        *overrides,
    )
    return out.strip().split(";")[0]


def wait_done(env: dict[str, str], job: str, timeout: float = 300) -> str:
    """Until ``job`` ended; ``timeout`` is scaled by the timeout factor."""
    timeout = scaled_timeout(timeout)
    deadline = time.monotonic() + timeout
    while (state := job_field(env, job, "JobState")) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        if state == "PENDING" and job_field(env, job, "Reason") == "BeginTime":
            slurm(env, "scontrol", "update", f"JobId={job}", "StartTime=now")  # skip the requeue delay
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout}s"
        time.sleep(0.5)
    return state


def losses(run_dir: Path) -> dict[int, float]:
    from megalm.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_srun_discovery(slurm_env, tmp_path):
    slurm(
        slurm_env, "srun", "-n", "2", "--cpus-per-task=1", PYTHON, "-c", DISCOVER, str(tmp_path), timeout=120
    )
    ranks = read_rank_records(tmp_path, 2)
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert [(r["launcher"], r["rank"], r["world_size"], r["local_rank"]) for r in ranks] == [
        ("srun", 0, 2, 0),
        ("srun", 1, 2, 1),
    ]
    assert all(r["master_addr"] == host for r in ranks)


def test_hostfile_from_the_allocation(slurm_env, tmp_path):
    out = tmp_path / "hostfile"
    slurm(slurm_env, "srun", "-n", "1", "bash", str(ROOT / "launch/slurm/make_hostfile.sh"), str(out), "2")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert out.read_text() == f"{host} slots=2\n"


@pytest.fixture(scope="module")
def straight_and_preempted(slurm_env, golden_data, tmp_path_factory) -> tuple[Path, Path, str, float]:
    """Two 2-task sbatch jobs of the golden config, 30 steps; the second gets SIGUSR1 mid-run."""
    straight, preempted = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("preempted")
    extra = {"training.max_steps": JOB_STEPS, "training.sample_tokens": 0}
    job_a = submit(slurm_env, straight, golden_run_overrides(straight, golden_data, **extra))
    job_b = submit(slurm_env, preempted, golden_run_overrides(preempted, golden_data, **extra))
    deadline = time.monotonic() + scaled_timeout(300)
    while last_step(preempted) < 3:
        assert time.monotonic() < deadline, (preempted / "slurm.out").read_text()[-3000:]
        assert job_field(slurm_env, job_b, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.1)
    slurm(slurm_env, "scancel", "--signal=USR1", job_b)
    t_signal = time.monotonic()
    while job_field(slurm_env, job_b, "Restarts") == "0":
        assert time.monotonic() - t_signal < scaled_timeout(120), (preempted / "slurm.out").read_text()[
            -3000:
        ]
        time.sleep(0.2)
    requeue_s = time.monotonic() - t_signal
    assert wait_done(slurm_env, job_a) == "COMPLETED", (straight / "slurm.out").read_text()[-3000:]
    t_release = time.monotonic()
    assert wait_done(slurm_env, job_b) == "COMPLETED", (preempted / "slurm.out").read_text()[-3000:]
    print(f"signal -> requeued {requeue_s:.1f}s; release -> finished {time.monotonic() - t_release:.1f}s")
    return straight, preempted, job_b, requeue_s


def test_sbatch_two_tasks_trains_and_checkpoints(straight_and_preempted):
    straight = straight_and_preempted[0]
    out = (straight / "slurm.out").read_text()
    assert "launcher srun | rank 0/2" in out and "launcher srun | rank 1/2" in out
    assert "srun exited with 0" in out
    assert sorted(losses(straight)) == list(range(1, JOB_STEPS + 1))
    assert find_latest(straight / "checkpoints").name == f"step_{JOB_STEPS:08d}"
    assert_matches_golden(straight, "llama")  # srun's 2 tasks are dp=2: steps 1-20 within 1e-5


def test_sigusr1_checkpoints_requeues_and_resumes_to_equal_losses(straight_and_preempted):
    straight, preempted, job, _ = straight_and_preempted
    out = (preempted / "slurm.out").read_text()  # --open-mode=append: both runs' output
    assert "(restart 0)" in out and "(restart 1)" in out
    stopped = int(out.split("stopping after step ")[1].split(",")[0])
    assert 3 <= stopped < JOB_STEPS
    assert f"preempt | saved step {stopped}" in out or f"step {stopped} is already saved" in out
    assert f"preempt | requeued Slurm job {job}" in out
    assert f"resumed from {preempted}/checkpoints/step_{stopped:08d} at step {stopped}" in out
    assert f"exiting with code {EXIT_PREEMPTED}" in out
    a, b = losses(straight), losses(preempted)
    after = range(stopped + 1, JOB_STEPS + 1)
    assert sorted(b) == list(range(1, JOB_STEPS + 1))
    assert [b[s] for s in after] == [a[s] for s in after]  # bitwise
    assert_matches_golden(preempted, "llama")  # and the absolute numbers, across the resume if before 20
    assert find_latest(preempted / "checkpoints").name == f"step_{JOB_STEPS:08d}"
    assert os.path.getsize(preempted / "metrics.jsonl") > 0
