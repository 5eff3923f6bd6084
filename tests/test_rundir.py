"""One run per ``run.dir`` (the lock), torn ``metrics.jsonl`` repair, and run directories that
cannot be written (under a file, read-only, full disk): one ``error:`` line each.

Read-only and full file systems are real: a tmpfs mounted read-only or 512 KiB small when
this process may mount (root); otherwise the same code is driven with the injected
``OSError`` (``describe_write_error`` tests below run everywhere).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megalm.train.metrics import MetricsLog, read_metrics
from megalm.train.rundir import RunDirError, RunLock, describe_write_error
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_overrides
from tests.launching import CONFIG, run_pretrain

HOLD = """
import os, sys, time
from megalm.train.rundir import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()  # a forked child (a loader worker) must not keep the lock alive
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_lock_names_its_holder_and_is_free_the_moment_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(RunDirError) as e:
            RunLock(tmp_path / "run").acquire()
        print(f"error: {e.value}")
        assert (
            f"run.dir '{tmp_path / 'run'}' is in use by pid {holder.pid} on host {os.uname().nodename}"
            in str(e.value)
        )
        assert "(job " in str(e.value) and "started 20" in str(e.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock = RunLock(tmp_path / "run")
        lock.acquire()  # at once, though the forked child still runs
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_torn_last_metrics_line_is_dropped_and_noted(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 6.0}\n{"step": 2, "val_loss": 5.9}\n{"step": 3, "loss": 5.8}\n{"step": 4, "lo'
    )
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    log = MetricsLog(tmp_path, 2)  # resuming after step 2: step 3 goes, the torn line goes
    log.write({"step": 3, "loss": 5.7})
    log.close()
    assert read_metrics(path) == [
        {"step": 1, "loss": 6.0},
        {"step": 2, "val_loss": 5.9},
        {"step": 3, "loss": 5.7},
    ]
    note = capsys.readouterr().out.strip()
    assert (
        note
        == f"metrics | dropped unreadable line 4 of {path} (15 characters, a record torn by a kill mid-write)"
    )


def test_write_errors_name_the_path_and_the_cause(tmp_path, monkeypatch):
    """The injected form of what the mounted file systems below give for real."""
    run = tmp_path / "run"
    (tmp_path / "file").write_text("")
    assert describe_write_error(tmp_path / "file" / "run", NotADirectoryError(errno.ENOTDIR, "x")) == (
        f"cannot write '{tmp_path / 'file' / 'run'}': '{tmp_path / 'file'}' is a file, not a directory; "
        "choose another run.dir"
    )
    assert "read-only file system" in describe_write_error(run, OSError(errno.EROFS, "Read-only file system"))
    assert "no space left on device" in describe_write_error(run, OSError(errno.ENOSPC, "No space left"))
    # torch's zip writer names no cause ("unexpected pos ..."): the free space tells
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10, 0, 0, 10, 0, 0, 0, 255)))
    torch_error = RuntimeError(
        "[enforce fail at inline_container.cc:783] . unexpected pos 5041472 vs 5041360"
    )
    assert describe_write_error(run, torch_error) == (
        f"cannot write '{run}': no space left on device (0 bytes free); free space or choose another run.dir"
    )


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """A tmpfs mounted at ``path`` with ``options`` (yields False when this process may not mount)."""
    path.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(path)], check=True)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    print(errors[0])
    return errors[0]


@pytest.mark.slow
def test_run_dir_under_a_file_or_read_only_is_one_error_line(shards_dir, tmp_path):
    (tmp_path / "file").write_text("")
    line = _one_error_line(run_pretrain(tiny_overrides(tmp_path / "file" / "run", shards_dir)))
    assert line == (
        f"error: run.dir: cannot write '{tmp_path / 'file' / 'run'}': '{tmp_path / 'file'}' is a file, "
        "not a directory; choose another run.dir"
    )
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
        if not mounted:  # not root: a directory without write permission is read-only to us
            assert os.geteuid() != 0, "root that may not mount: the injected EROFS test covers it"
            (tmp_path / "ro").chmod(0o555)
        line = _one_error_line(run_pretrain(tiny_overrides(tmp_path / "ro" / "run", shards_dir)))
    cause = "read-only file system; choose a run.dir on a writable one" if mounted else "permission denied"
    assert line.startswith(f"error: run.dir: cannot write '{tmp_path / 'ro' / 'run'}': {cause}")


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_error_line_and_keeps_what_was_written(shards_dir, tmp_path):
    with tmpfs(tmp_path / "small", "size=512k") as mounted:
        if not mounted:
            pytest.skip(
                "mounting a tmpfs needs root; test_write_errors_name_the_path_and_the_cause injects ENOSPC"
            )
        run = tmp_path / "small" / "run"
        proc = run_pretrain(
            tiny_overrides(run, shards_dir, **{"training.max_steps": 4, "training.save_interval": 2})
        )
        line = _one_error_line(proc)
        assert line.startswith(
            f"error: checkpoint of step 2: cannot write '{run / 'checkpoints'}': no space left"
        )
        assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
        assert not (run / "checkpoints" / "latest").exists()


def _pretrain(run_dir: Path, shards_dir: Path, **extra: object) -> subprocess.Popen:
    cmd = [
        PYTHON,
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        CONFIG,
        *tiny_overrides(run_dir, shards_dir, **extra),
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_two_runs_started_together_on_one_run_dir_exactly_one_trains(shards_dir, tmp_path):
    procs = [_pretrain(tmp_path, shards_dir, **{"training.max_steps": 6}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    errors = [line for line in outs[loser][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is in use by pid {procs[winner].pid} on host" in errors[0], outs[loser][1]
    print(errors[0])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


@pytest.mark.slow
def test_sigkilled_run_is_requeued_at_once_and_its_torn_metrics_line_repaired(shards_dir, tmp_path):
    first = _pretrain(tmp_path, shards_dir, **{"training.max_steps": 500, "training.save_interval": 3})
    deadline = time.monotonic() + 300
    while (
        not (tmp_path / "checkpoints" / "latest").exists()
        or len(read_metrics(tmp_path / "metrics.jsonl")) < 5
    ):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "loss": 1.2')  # what a kill in the middle of a write leaves
    latest = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    proc = run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"training.max_steps": latest + 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped unreadable line" in proc.stdout and "a record torn by a kill mid-write" in proc.stdout
    assert f"resumed from {tmp_path / 'checkpoints'}" in proc.stdout
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, latest + 3))
    print(f"requeued after SIGKILL: resumed at step {latest}, lock taken at once, torn line dropped")
