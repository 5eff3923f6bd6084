"""Preemption and failure handling of real 2-rank training jobs on CPU/gloo.

The ranks are started directly with the ``env://`` variables (no launcher that
would kill the survivors for us), so each rank's own exit code is what gets
checked. The tests assert on events and their order (exit codes, checkpoints,
log lines); the one duration asserted is the named bound :data:`HANG_EXIT_SLACK_S`
(a dead or hung peer ends the job within ``dist.timeout_s`` plus that slack).
Every wait is scaled by ``MEGALM_TEST_TIMEOUT_FACTOR``. The Slurm path (requeue,
resume, equal losses) is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from megalm.train.checkpoint import find_latest
from megalm.train.metrics import read_metrics
from tests.conftest import PYTHON, ROOT, scaled_timeout, tiny_overrides
from tests.launching import CONFIG, cpu_env, finish, free_port, start_ranks

pytestmark = pytest.mark.slow
EXIT_PREEMPTED = 75
# The bound the hang test asserts: after dist.timeout_s a rank whose peer died or hung has
# exited within this many more seconds (process teardown), times the timeout factor.
HANG_EXIT_SLACK_S = 15


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_metrics(path) if "loss" in r] if path.exists() else []
    return max(steps, default=0)


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until ``run_dir`` logged ``step`` (fails if a rank exits first or after ``timeout``, scaled)."""
    timeout = scaled_timeout(timeout)
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read() if p.stdout else ""
                pytest.fail(f"a rank exited ({p.returncode}) before step {step}:\n{out[-3000:]}")
        assert time.monotonic() < deadline, f"no step {step} in {timeout}s"
        time.sleep(0.05)


def in_order(text: str, *events: str) -> bool:
    """Every event (a regular expression) occurs in ``text``, each after the previous one."""
    pos = 0
    for event in events:
        m = re.compile(event).search(text, pos)
        if m is None:
            return False
        pos = m.end()
    return True


def test_signal_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(shards_dir, tmp_path):
    procs = start_ranks(tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 200}))
    wait_for_step(tmp_path, 3, procs)
    t0 = time.monotonic()
    os.kill(procs[1].pid, signal.SIGUSR1)  # only rank 1 is told
    results = finish(procs, scaled_timeout(120))
    stop_s = time.monotonic() - t0
    assert [r[0] for r in results] == [EXIT_PREEMPTED] * 2, results[0][1][-3000:] + results[1][1][-3000:]
    stopped = last_step(tmp_path)
    assert 3 <= stopped < 200
    latest = find_latest(tmp_path / "checkpoints")
    assert latest is not None and latest.name == f"step_{stopped:08d}"
    assert json.loads((latest / "meta.json").read_text())["step"] == stopped
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == latest.name
    out = results[0][1]  # rank 0 logs for both ranks: the last step, the stop, the save, the exit
    assert in_order(
        out,
        rf"step +{stopped}/200",
        rf"preempt \| a signal on another rank: stopping after step {stopped},",
        rf"preempt \| (saved step {stopped} in|step {stopped} is already saved)",
        rf"preempt \| exiting with code {EXIT_PREEMPTED}",
    ), out[-3000:]
    assert f"step {stopped + 1:>5}/200" not in out  # no step after the agreed one
    print(f"signal -> both ranks exited: {stop_s:.2f}s (stopped at step {stopped})")


def test_grace_budget_exceeded_keeps_the_previous_checkpoint(shards_dir, tmp_path):
    overrides = tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 200, "preempt.grace_s": 0})
    procs = start_ranks(overrides)
    wait_for_step(tmp_path, 12, procs)  # step 10 was saved
    os.kill(procs[0].pid, signal.SIGTERM)
    results = finish(procs, scaled_timeout(120))
    assert [r[0] for r in results] == [EXIT_PREEMPTED] * 2, results[0][1][-3000:]
    assert in_order(
        results[0][1],
        r"preempt \| SIGTERM: stopping after step \d+",
        r"grace budget spent before the save; the previous checkpoint stays latest",
        rf"preempt \| exiting with code {EXIT_PREEMPTED}",
    ), results[0][1][-3000:]
    assert last_step(tmp_path) > 10
    assert find_latest(tmp_path / "checkpoints").name == "step_00000010"
    assert not any(p.name > "step_00000010" for p in (tmp_path / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_dead_or_hung_rank_ends_the_job_within_the_timeout(shards_dir, tmp_path, how):
    timeout_s = 20
    overrides = tiny_overrides(
        tmp_path, shards_dir, **{"training.max_steps": 400, "dist.timeout_s": timeout_s}
    )
    procs = start_ranks(overrides)
    wait_for_step(tmp_path, 12, procs)
    os.kill(procs[1].pid, getattr(signal, how))
    t0 = time.monotonic()
    bound = timeout_s + scaled_timeout(HANG_EXIT_SLACK_S)
    ((code, out, _),) = finish(procs[:1], bound + scaled_timeout(15))
    elapsed = time.monotonic() - t0
    procs[1].kill()
    procs[1].communicate()
    assert code == 1, out[-3000:]
    assert elapsed < bound, f"rank 0 took {elapsed:.1f}s to exit after the peer's {how} (bound {bound:.0f}s)"
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: a collective of training step"), out[
        -3000:
    ]
    assert f"(dist.timeout_s={timeout_s}) failed in the data-parallel group [0, 1]: " in errors[0]
    missing = f"rank 1 (host {socket.gethostname()}) did not answer within 5s: dead or hung"
    assert errors[0].endswith(f"{missing} (look at its log and its host)")
    print(errors[0])
    assert last_step(tmp_path) < 400
    print(f"{how} on rank 1 -> rank 0 exited {code} after {elapsed:.1f}s (dist.timeout_s={timeout_s})")
    if how == "SIGKILL":  # the last good checkpoint still loads and training goes on from it
        latest = find_latest(tmp_path / "checkpoints")
        assert latest is not None
        step = int(latest.name.split("_")[1])
        resumed = finish(
            start_ranks(overrides[:-1] + [f"training.max_steps={step + 2}"]), scaled_timeout(240)
        )
        assert [r[0] for r in resumed] == [0, 0], resumed[0][1][-3000:]
        assert f"resumed from {latest}" in resumed[0][1]


WATCHDOG = """
import os, signal, time
import torch.distributed as dist
from megalm.config.schema import PreemptConfig
from megalm.train.preempt import Preemption
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
p = Preemption(PreemptConfig(grace_s=2.0, requeue=False))
os.kill(os.getpid(), signal.SIGUSR1)
assert p.local_flag() == 1.0 and p.agree(True)
p.stop(7, lambda step: time.sleep(3600), already_saved=False)
print("not reached")
"""


def test_watchdog_abandons_a_save_that_outlives_the_grace_budget():
    """The save never returns, so only the watchdog can end the process: exit code 75 after the
    watchdog's message proves it fired (no wall-clock assertion)."""
    proc = subprocess.run(
        [PYTHON, "-c", WATCHDOG.format(port=free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
        timeout=scaled_timeout(120),
    )
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout
    assert in_order(
        proc.stdout,
        r"preempt \| SIGUSR1: stopping after step 7, \d+\.\ds of grace left",
        r"save still running after the \d+\.\ds grace budget; abandoning it",
        rf"preempt \| exiting with code {EXIT_PREEMPTED}",
    ), proc.stdout
    assert "not reached" not in proc.stdout and "saved step 7" not in proc.stdout


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _torchrun(overrides: list[str]) -> subprocess.Popen:
    cmd = [PYTHON, str(ROOT / "launch" / "torchrun.py"), "--nproc_per_node", "2", "--master_port"]
    cmd += [str(free_port()), str(ROOT / "launch" / "pretrain.py"), "--config", CONFIG, *overrides]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_torchrun_wrapper_exits_75_after_a_preemption_and_2_on_a_bad_config(shards_dir, tmp_path):
    """torchrun exits 1 whenever a worker fails; launch/torchrun.py passes the ranks' common code on."""
    bad = _torchrun([f"run.dir={tmp_path / 'bad'}", "model.d_model=0"])
    out, _ = bad.communicate(timeout=scaled_timeout(300))
    assert bad.returncode == 2 and "torchrun: every failed rank exited 2; exiting 2" in out, out[-3000:]
    proc = _torchrun(tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": 200}))
    wait_for_step(tmp_path, 3, [proc])
    os.kill(_children(proc.pid)[1], signal.SIGUSR1)  # one worker is told
    out, _ = proc.communicate(timeout=scaled_timeout(300))
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "torchrun: every failed rank exited 75; exiting 75" in out
    print(f"launch/torchrun.py exited {proc.returncode} after SIGUSR1 to one worker (torchrun alone: 1)")
