"""Fetch the files of a remote ``data.dir`` through webdataset's URL openers.

``data.dir`` may be

- ``http://...`` / ``https://...``: fetched with ``curl``, the tool webdataset's
  ``gopen`` runs for these schemes;
- ``s3://bucket/prefix``: ``aws s3 cp URL -``; ``gs://bucket/prefix``: ``gsutil cat URL``
  (each needs its command-line tool on every node, as webdataset's ``pipe:`` URLs do);
- ``pipe:COMMAND``: a shell command that prints a file; ``{}`` in it is replaced by
  the file name, otherwise ``/NAME`` is appended (``pipe:ssh host cat /data/shards``).

Every transfer is a webdataset ``gopen.Pipe``: a subprocess whose exit status is
checked on every read and at close, so a connection dropped mid-file is an error,
never a short file. megalm holds no HTTP client. The command lines are megalm's
rather than ``gopen``'s defaults for one reason: the retry policy must be ours
(``gopen`` runs ``curl --retry 30 --retry-delay 2``, up to a minute of silent retries
per file), so that a fault ends after ``data.fetch_retries`` retries with
exponential backoff in one :class:`FetchError` naming the URL.

A file is written to a temporary name beside its destination, checked against the
manifest's sha256 while it streams in, made read-only and published by
``os.replace``: nothing half-downloaded is ever visible under the final name. A
sha256 mismatch (corrupt bytes, a transfer cut short unnoticed) is fetched once
more, then :class:`CorruptFile`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from megalm.data.errors import CorruptFile, DataError, FetchError

PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")
BACKOFF_S = 0.5  # first retry delay; doubled for every further retry
CHUNK = 1 << 20
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MISSING = re.compile(r"error: 404\b|\(404\)|Not Found|NoSuchKey|No URLs matched|No such file", re.I)
_TOOLS = {
    "http": ("curl", "the curl package"),
    "https": ("curl", "the curl package"),
    "s3": ("aws", "pip install awscli"),
    "gs": ("gsutil", "the Google Cloud SDK"),
}


def is_remote(root: object) -> bool:
    """Whether ``root`` (a ``data.dir`` value) names a remote location rather than a local path."""
    return isinstance(root, str) and root.startswith(PREFIXES)


def file_url(root: str, name: str) -> str:
    """The URL (or ``pipe:`` command) of file ``name`` of the remote data set at ``root``.

    Raises:
        DataError: ``name`` is not a plain file name (a manifest must not reach outside
            its directory, nor inject shell syntax into a ``pipe:`` command).
    """
    if not _PLAIN_NAME.match(name):
        raise DataError(
            f"file name {name!r} in the manifest of {root} is not a plain file name; "
            "regenerate the data set with data_tools.preprocess"
        )
    return root.replace("{}", name) if "{}" in root else f"{root.rstrip('/')}/{name}"


def _command(url: str) -> tuple[list[str] | str, bool]:
    """The command that prints ``url``'s bytes, and whether it runs in a shell."""
    if url.startswith("pipe:"):
        return url[len("pipe:") :], True
    scheme = url.split("://", 1)[0]
    tool, how = _TOOLS[scheme]
    if shutil.which(tool) is None:
        raise DataError(
            f"{scheme}:// data needs the `{tool}` command-line tool on every node ({how}); "
            "install it or copy the shards to a local data.dir"
        )
    if tool == "curl":
        # -f: HTTP errors fail; --speed-*: a stalled transfer fails instead of hanging.
        cmd = ["curl", "-f", "-s", "-S", "-L", "--connect-timeout", "30"]
        return [*cmd, "--speed-limit", "1", "--speed-time", "60", url], False
    if tool == "aws":
        return ["aws", "s3", "cp", "--only-show-errors", url, "-"], False
    return ["gsutil", "-q", "cat", url], False


def _stream_once(url: str, sink: Callable[[bytes], None]) -> None:
    """Pass ``url``'s bytes to ``sink`` once.

    Raises:
        OSError: the transfer failed; the message is the tool's own (e.g. curl's).
    """
    from webdataset.gopen import Pipe  # imported here: webdataset imports torch

    cmd, shell = _command(url)
    pipe = Pipe(cmd, mode="rb", shell=shell, bufsize=CHUNK, stderr=subprocess.PIPE, ignore_status=[141])
    try:
        while chunk := pipe.read(CHUNK):
            sink(chunk)
        pipe.close()
    except OSError:
        pipe.proc.kill()
        pipe.proc.wait()
        detail = pipe.proc.stderr.read().decode(errors="replace").strip().splitlines()
        raise OSError(detail[-1] if detail else f"exit status {pipe.proc.returncode}") from None
    finally:
        if pipe.proc.poll() is None:  # the sink failed: stop the transfer
            pipe.proc.kill()
            pipe.proc.wait()
        pipe.proc.stderr.close()
        pipe.stream.close()


def _with_retries(url: str, once: Callable[[], str], retries: int) -> str:
    """``once()`` with up to ``retries`` retries (backoff 0.5 s, 1 s, 2 s, ...) on transfer errors.

    Raises:
        FetchError: the file does not exist (no retries), or every attempt failed.
    """
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            delay = BACKOFF_S * 2 ** (attempt - 1)
            print(f"warning: fetching {url} failed ({last}); retry {attempt}/{retries} in {delay:g}s")
            sys.stdout.flush()
            time.sleep(delay)
        try:
            return once()
        except OSError as e:
            last = str(e)
            if _MISSING.search(last):
                raise FetchError(f"{url} does not exist ({last}); check data.dir", missing=True) from None
    raise FetchError(
        f"fetching {url} failed after {retries + 1} attempts ({last}); check that the server is "
        "reachable and data.dir is right, or raise data.fetch_retries"
    )


def read_bytes(url: str, retries: int) -> bytes:
    """The whole file at ``url`` in memory (a manifest, an index); retried like :func:`download`."""
    parts: list[bytes] = []

    def once() -> str:
        parts.clear()
        _stream_once(url, parts.append)
        return ""

    _with_retries(url, once, retries)
    return b"".join(parts)


def _to_file(url: str, tmp: Path) -> str:
    """Stream ``url`` into ``tmp``; returns the sha256 of what arrived (``tmp`` removed on failure).

    Raises:
        OSError: the transfer failed (retried by the caller).
        DataError: ``tmp`` cannot be written (a local problem: not retried).
    """
    h = hashlib.sha256()
    hint = "free space or change data.cache_dir / data.cache_gb"
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise DataError(f"cannot write the cache file {tmp} ({e}); {hint}") from None

    def sink(chunk: bytes) -> None:
        h.update(chunk)
        try:
            f.write(chunk)
        except OSError as e:
            raise DataError(f"cannot write the cache file {tmp} ({e}); {hint}") from None

    try:
        with f:
            _stream_once(url, sink)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None, retries: int) -> None:
    """Fetch ``url`` to ``dest``: temporary file, sha256 check, read-only, rename.

    ``sha256=None`` (a file the manifest gives no checksum for) skips the check.

    Raises:
        FetchError: missing file, or transfer failures beyond ``retries``.
        CorruptFile: two transfers in a row did not match ``sha256``.
        DataError: the cache file cannot be written (disk full, permissions).
    """
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    got = ""
    for attempt in range(2):
        got = _with_retries(url, lambda: _to_file(url, tmp), retries)
        if sha256 is None or got == sha256:
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
            return
        tmp.unlink()
        if attempt == 0:
            print(f"warning: {url} failed its sha256 check; fetching it again", flush=True)
    raise CorruptFile(
        f"{url} fails its sha256 check on two fetches (manifest {sha256[:12]}..., got {got[:12]}...): the "
        "copy on the server is corrupt or was replaced; re-upload the data set, or set data.on_bad_data=skip"
    )
