"""Write a data set beside its destination, then publish it in one rename.

``preprocess`` and ``megatron import`` write into ``.<name>.partial-<host>-<pid>``,
a sibling of ``--output``, and publish it only when it is complete:

- a failed run removes its partial directory and leaves ``--output`` as it was; a
  killed one leaves the partial directory, which the next run on that output removes;
- a directory that already holds a data set is replaced only with ``--overwrite``,
  and then atomically: Linux ``renameat2(RENAME_EXCHANGE)`` swaps the complete new
  set and the old one, so a reader finds one whole set or the other at every
  instant (elsewhere two renames, a moment apart); the old set is deleted after;
- published files are read-only, and nothing ever truncates or rewrites one: a
  trainer that memory-mapped the old shards keeps reading them after the swap and
  the deletion (the kernel frees them when it lets go), never a SIGBUS;
- a directory holding anything a megalm tool would not write is never replaced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_tools.inputs import InputError

_DATASET_FILE = re.compile(r"^(manifest\.json|tokenizer\.json|(train|val)-\d+\.tar(\.index\.npy)?)$")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an ``--output`` that must not be replaced; call before any work.

    Raises:
        InputError: a file, a directory with other files, or a data set without ``overwrite``.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"--output '{output}' is a file; give the path of a directory to create")
    if not output.is_dir():
        return
    names = sorted(p.name for p in output.iterdir())
    strangers = [n for n in names if not _DATASET_FILE.match(n)]
    if strangers:
        raise InputError(
            f"--output '{output}' holds files that are not part of a megalm data set "
            f"({', '.join(strangers[:3])}); choose a new or empty directory"
        )
    if "manifest.json" in names and not overwrite:
        raise InputError(
            f"--output '{output}' already holds a data set; pass --overwrite to replace it (the old "
            "set stays readable until the new one is complete) or choose another directory"
        )


def _sibling(output: Path, kind: str) -> Path:
    return output.with_name(f".{output.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def _remove_stale(output: Path) -> None:
    """Remove what killed runs on ``output`` left on this host; put back a set caught mid-swap."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(partial|replaced)-(.+)-(\d+)$")
    for p in output.parent.glob(f".{output.name}.*"):
        match = pattern.match(p.name)
        if not match or match[2] != socket.gethostname() or _alive(int(match[3])):
            continue
        if match[1] == "replaced" and not output.exists():
            os.rename(p, output)  # killed between the two renames of a swap: the old set goes back
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2`` ``RENAME_EXCHANGE``); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(staging: Path, output: Path) -> None:
    """Make ``staging`` the data set at ``output`` (read-only files); delete what was there."""
    for f in staging.iterdir():
        f.chmod(0o444)
    if not output.exists():
        os.rename(staging, output)
        return
    if not _exchange(staging, output):
        replaced = _sibling(output, "replaced")
        os.rename(output, replaced)
        os.rename(staging, output)
        staging = replaced
    shutil.rmtree(staging)  # now the old set


@contextmanager
def staged_output(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory beside ``output`` to write a data set into; published if the block succeeds.

    Raises:
        InputError: see :func:`check_output` (checked again here, before anything is written).
    """
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(output)
    staging = _sibling(output, "partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, output)
