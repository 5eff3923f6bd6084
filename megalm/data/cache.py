"""The node-local cache that remote shards are fetched into before they are memory-mapped.

Layout under ``data.cache_dir`` (default ``$TMPDIR/megalm-cache-<uid>``), one cache
per node, shared by every rank and DataLoader worker on it::

    shards/<sha256[:20]>-<file>   shard tars, named by content; bounded by data.cache_gb (LRU)
    meta/<sha256[:20]>-<file>     tokenizer and index sidecars (small, never evicted)
    locks/<name>.lock             flock: one download per file per node; ``.evict`` guards eviction

A process that needs a file takes that file's lock, finds it already published or
downloads it (:func:`megalm.data.remote.download`: temporary file, sha256 check,
read-only, rename) and lets go; a rank that waited on the lock then finds it
published, so a node fetches each file once. Files are named by their sha256, so a
cached copy is what the manifest describes; it is trusted without re-hashing
because nothing reaches its final name unverified.

Least recently used eviction: a shard's mtime is its last use (set when it is
published, and refreshed while a loader keeps asking for it). After a shard is
published, the oldest others are deleted until the shards fit in ``data.cache_gb``
(the cache can exceed it by the shards in flight, and always holds the newest one).
Deleting never truncates: a process that still maps a deleted shard keeps reading
it, and :class:`~megalm.data.shards.ShardDocuments` lets go of deleted shards when it
opens another, so the disk space returns.

Background prefetch: :meth:`ShardCache.prefetch` queues a fetch on two daemon
threads (daemon, so the end of a run never waits for shards it will not read);
:meth:`ShardCache.get` waits for a queued fetch of the same file instead of
starting a second one, and re-raises its error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from megalm.data.errors import DataError
from megalm.data.remote import download

PREFETCH_THREADS = 2
TOUCH_EVERY_S = 10.0  # refresh a shard's LRU time at most this often per process


def default_dir() -> Path:
    """``$TMPDIR/megalm-cache-<uid>``: node-local, one per user."""
    return Path(tempfile.gettempdir()) / f"megalm-cache-{os.getuid()}"


class _Fetcher:
    """Daemon threads running queued calls; ``submit`` returns a ``Future``."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(threads):
            threading.Thread(target=self._run, name=f"megalm-fetch-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Path], *args: object) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)


class ShardCache:
    """Fetched files of remote data sets on local disk (see the module docstring).

    Args:
        root: the cache directory (created if missing).
        capacity: bytes of shards to keep.
        retries: retries per transfer before an error (``data.fetch_retries``).
    """

    def __init__(self, root: Path, capacity: int, retries: int) -> None:
        self.root, self.capacity, self.retries = Path(root), capacity, retries
        for sub in ("shards", "meta", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._init_threads()

    def _init_threads(self) -> None:
        self._fetcher: _Fetcher | None = None
        self._futures: dict[Path, Future] = {}
        self._mutex = threading.Lock()
        self._touched: dict[Path, float] = {}

    def __getstate__(self) -> dict:  # DataLoader workers get the settings, not the threads
        return {"root": self.root, "capacity": self.capacity, "retries": self.retries}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_threads()

    @classmethod
    def from_config(cls, data=None) -> ShardCache:
        """The cache ``data`` (a ``DataConfig``; ``None``: the defaults) asks for.

        Raises:
            DataError: a bad ``data.cache_gb`` / ``data.fetch_retries``, or an unwritable directory.
        """
        from megalm.config.schema import DataConfig

        data = data or DataConfig()
        if data.cache_gb <= 0 or data.fetch_retries < 0:
            raise DataError(
                f"data.cache_gb must be > 0 and data.fetch_retries >= 0, got {data.cache_gb} and "
                f"{data.fetch_retries}"
            )
        root = Path(data.cache_dir) if data.cache_dir else default_dir()
        try:
            return cls(root, int(data.cache_gb * 2**30), data.fetch_retries)
        except OSError as e:
            raise DataError(
                f"cannot create the shard cache '{root}' ({e}); set data.cache_dir to a writable directory"
            ) from None

    @property
    def key(self) -> tuple:
        """What makes two caches the same: directory, capacity, retries."""
        return (self.root.resolve(), self.capacity, self.retries)

    # -- files -------------------------------------------------------------------------
    def path(self, url: str, name: str, sha256: str | None, kind: str = "shards") -> Path:
        """Where the copy of ``url`` lives: named by its sha256 (or, without one, by the URL's)."""
        key = sha256 or hashlib.sha256(url.encode()).hexdigest()
        return self.root / kind / f"{key[:20]}-{name}"

    def get(self, url: str, name: str, sha256: str | None, kind: str = "shards") -> Path:
        """The local, verified copy of ``url``, fetched now if no background fetch has it.

        Without ``sha256`` (nothing to verify a cached copy against) the file is fetched anew.

        Raises:
            FetchError, CorruptFile, DataError: see :func:`megalm.data.remote.download`.
        """
        dest = self.path(url, name, sha256, kind)
        with self._mutex:
            future = self._futures.pop(dest, None)
        if future is not None:
            future.result()
            if dest.exists():  # (unless evicted since)
                return dest
        return self._fetch(url, dest, sha256)

    def prefetch(self, url: str, name: str, sha256: str | None, kind: str = "shards") -> None:
        """Fetch ``url`` in the background unless it is cached (then it counts as used) or queued."""
        dest = self.path(url, name, sha256, kind)
        if sha256 is not None and dest.exists():
            self.touch(dest)
            return
        with self._mutex:
            if dest in self._futures:
                return
            if self._fetcher is None:
                self._fetcher = _Fetcher(PREFETCH_THREADS)
            self._futures[dest] = self._fetcher.submit(self._fetch, url, dest, sha256)

    def drain(self) -> None:
        """Wait until the background fetches queued so far have finished (their errors are dropped)."""
        with self._mutex:
            futures = list(self._futures.values())
        for future in futures:
            future.exception()

    def touch(self, path: Path) -> None:
        """Mark ``path`` as used now (least recently used eviction), at most every few seconds."""
        now = time.time()
        if now - self._touched.get(path, 0.0) < TOUCH_EVERY_S:
            return
        self._touched[path] = now
        with contextlib.suppress(OSError):  # evicted meanwhile, or another user's file
            os.utime(path)

    def _fetch(self, url: str, dest: Path, sha256: str | None) -> Path:
        if sha256 is not None and dest.exists():
            self.touch(dest)
            return dest
        with self._locked(dest.name):
            if sha256 is None or not dest.exists():  # another rank may have fetched it meanwhile
                download(url, dest, sha256, self.retries)
        if dest.parent.name == "shards":
            self._evict(keep=dest)
        return dest

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """An exclusive flock on ``locks/<name>.lock`` (released when the process dies).

        Raises:
            DataError: the cache's file system cannot lock (some network file systems).
        """
        path = self.root / "locks" / f"{name}.lock"
        with open(path, "a") as f:  # "a": create, never truncate
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as e:
                raise DataError(f"cannot lock {path} ({e}); put data.cache_dir on a local disk") from None
            yield

    def _evict(self, keep: Path) -> None:
        """Delete least recently used shards (never ``keep``) until the rest fit in ``capacity``."""
        with self._locked(".evict"):
            files = []
            for p in (self.root / "shards").iterdir():
                if ".tmp-" in p.name:
                    _remove_if_orphaned(p)
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in files)
            for _, size, p in sorted(files):
                if total <= self.capacity:
                    break
                if p != keep:
                    p.unlink(missing_ok=True)
                    total -= size

    def cached_shards(self) -> list[Path]:
        """The shard files in the cache now (tests and benchmarks)."""
        return sorted(p for p in (self.root / "shards").iterdir() if ".tmp-" not in p.name)


def _remove_if_orphaned(tmp: Path) -> None:
    """Delete a partial download whose process (``<file>.tmp-<pid>-<thread>``) is gone."""
    try:
        pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        tmp.unlink(missing_ok=True)
    except (ValueError, PermissionError):  # not ours to judge, or alive under another user
        pass
