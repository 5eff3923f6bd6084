"""One run per ``run.dir``, and one readable line when the run directory cannot be written.

The lock is ``<run.dir>/.lock``: rank 0 opens it and takes an exclusive ``fcntl`` (POSIX
record) lock before anything else is written, then writes the holder into it (host, pid,
job id, start time). The operating system drops the lock when the process ends, however
it ends, so a SIGKILLed run never blocks its own requeue. POSIX locks belong to the
process, not to the file descriptor, so forked children (loader workers) never hold it
after the trainer dies; they also work over NFS with ``lockd``. The file is never
deleted (deleting a lock file others may have open races), so it names the last holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from megalm.config import ConfigError

LOCK_FILE = ".lock"
RUN_DIR_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
JOB_ID_VARS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


class RunDirError(ConfigError):
    """The run directory cannot be used (in use, not writable, full): one ``error:`` line, exit 2."""


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or itself) that is not a directory."""
    for p in [path, *path.parents]:
        if p.exists():
            return None if p.is_dir() else p
    return None


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the file system holding ``path`` (or its nearest ancestor)."""
    for p in [path, *path.parents]:
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def describe_write_error(path: Path, err: BaseException) -> str:
    """Why ``path`` under the run directory could not be written, in words, with the fix.

    ``err`` is the ``OSError`` (ENOTDIR, EROFS, EACCES, ENOSPC, EDQUOT, ...) or torch's
    ``RuntimeError`` from its zip writer, which names no cause ("unexpected pos ..."):
    then the free space of the file system tells whether it was full.
    """
    code = getattr(err, "errno", None)
    file = _file_ancestor(path)
    if code in (errno.ENOTDIR, errno.EEXIST) and file is not None:
        return f"cannot write '{path}': '{file}' is a file, not a directory; choose another run.dir"
    if code == errno.EROFS:
        return f"cannot write '{path}': read-only file system; choose a run.dir on a writable one"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot write '{path}': permission denied; choose a run.dir you can write"
    free = free_bytes(path)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < 1 << 20):
        cause = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        left = f" ({free} bytes free)" if free is not None else ""
        return f"cannot write '{path}': {cause}{left}; free space or choose another run.dir"
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    return f"cannot write '{path}': {reason}"


def holder_info() -> dict[str, Any]:
    """What the lock file records about the process that holds it."""
    job = next((f"{k}={os.environ[k]}" for k in JOB_ID_VARS if os.environ.get(k)), "none")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_holder(info: dict[str, Any]) -> str:
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
        f"(job {info.get('job', '?')}, started {info.get('started', '?')})"
    )


class RunLock:
    """The exclusive lock on ``run_dir`` (rank 0 takes it; see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create ``run_dir`` if needed and take the lock.

        Raises:
            RunDirError: another process holds it (naming it), or the directory cannot
                be created or written (naming the path and the cause).
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"run.dir: {describe_write_error(self.run_dir, e)}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RunDirError(f"run.dir: cannot lock '{self.path}': {e.strerror}") from None
            holder = self._read(fd)
            for _ in range(20):  # the holder may be between taking the lock and writing its name
                if holder:
                    break
                time.sleep(0.05)
                holder = self._read(fd)
            os.close(fd)
            raise RunDirError(
                f"run.dir '{self.run_dir}' is in use by {describe_holder(holder)}; wait for that run to end "
                "or choose another run.dir (one run per directory)"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"run.dir: {describe_write_error(self.path, e)}") from None
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):  # the holder is between open and its first write
            return {}

    def release(self) -> None:
        """Drop the lock (the process's exit does it too)."""
        if self._fd is not None:
            os.close(self._fd)  # closing any descriptor of the file releases a POSIX lock
            self._fd = None
