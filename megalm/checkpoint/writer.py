"""Writing a checkpoint tag so that a crash at any moment leaves ``latest`` loadable.

Protocol (each rank, then rank 0)::

    every rank   write its files (fsync, read back, compare sha256) -> .done/rank_XXXXX.json
    rank 0       every marker present -> manifest.json -> COMPLETE -> latest -> prune

``latest`` is replaced atomically and only names a tag whose ``COMPLETE`` exists, which is
written after the manifest, which is written after every rank verified its files; a
crash before ``COMPLETE`` leaves a tag that no resume looks at. Older tags are pruned
(``training.keep_checkpoints``) only after a newer tag is complete and verified.

Asynchronous saves run the same steps in a background thread per rank (file I/O only,
no collectives), so the ranks agree that a tag is complete through the done markers on
the shared file system, without a collective in the training loop.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from megalm.checkpoint.manifest import (
    COMPLETE,
    DONE_DIR,
    CheckpointError,
    atomic_write_text,
    check_file,
    done_ranks,
    publish_manifest,
    write_done_marker,
    write_synced,
)

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a ``COMPLETE`` marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.glob("step_*") if (p / COMPLETE).is_file())


def write_file(path: Path, data: bytes) -> dict[str, int | str]:
    """Write ``data``, fsync it, read it back and compare: the manifest entry of a verified file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synced(path, data)
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    problem = check_file(path.parent, path.name, entry)
    if problem is not None:
        raise CheckpointError(f"writing the checkpoint failed: {problem} right after it was written")
    return entry


def write_rank_files(tag_dir: Path, rank: int, files: dict[str, Callable[[], bytes]]) -> None:
    """Write this rank's files (``{tag-relative path: bytes producer}``), then its done marker."""
    entries = {name: write_file(tag_dir / name, make()) for name, make in files.items()}
    write_done_marker(tag_dir, rank, entries)


def wait_for_ranks(tag_dir: Path, world_size: int, timeout_s: float) -> None:
    """Rank 0: wait until every rank's done marker is present."""
    deadline = time.monotonic() + timeout_s
    while len(done_ranks(tag_dir)) < world_size:
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - done_ranks(tag_dir))
            raise CheckpointError(
                f"checkpoint '{tag_dir}': ranks {missing[:8]} did not finish writing within {timeout_s:.0f}s "
                "(training.save_timeout_s); the previous checkpoint stays latest"
            )
        time.sleep(0.02)


def publish(tag_dir: Path, world_size: int, keep: int, timeout_s: float) -> None:
    """Rank 0: manifest, ``COMPLETE``, ``latest``, then prune tags beyond the newest ``keep``."""
    wait_for_ranks(tag_dir, world_size, timeout_s)
    publish_manifest(tag_dir, world_size)
    atomic_write_text(tag_dir / COMPLETE, "")
    shutil.rmtree(tag_dir / DONE_DIR, ignore_errors=True)
    ckpt_dir = tag_dir.parent
    atomic_write_text(ckpt_dir / LATEST, tag_dir.name + "\n")
    for old in complete_tags(ckpt_dir)[:-keep] if keep > 0 else []:
        if old != tag_dir.name:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


class BackgroundSave:
    """One save running in a thread; :meth:`wait` joins it within a bound and re-raises its error.

    The thread is not a daemon: a process that ends while a save is in flight finishes
    it first (bounded by ``training.save_timeout_s`` on rank 0's wait for the others).
    """

    def __init__(self, tag: str, work: Callable[[], None]) -> None:
        self.tag, self.error = tag, None
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._run, args=(work,), name=f"save-{tag}")
        self.thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as e:  # handed to the training thread by wait()
            self.error = e

    def wait(self, timeout_s: float) -> float:
        """Block until the save is published (at most ``timeout_s``); returns the seconds waited."""
        t0 = time.perf_counter()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise CheckpointError(
                f"the background save of {self.tag} is still writing after {timeout_s:.0f}s "
                "(training.save_timeout_s); check the file system of run.dir; the previous checkpoint "
                "stays latest"
            )
        if self.error is not None:
            raise self.error
        return time.perf_counter() - t0
