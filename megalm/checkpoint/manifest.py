"""Integrity of a checkpoint tag: a manifest with the size and sha256 of every file.

Every rank hashes the files it wrote and leaves a done marker (``.done/rank_XXXXX.json``);
rank 0 merges the markers into ``manifest.json`` and only then writes ``COMPLETE``, so
a tag that says it is complete always says what it should hold. Loading checks every
file against it (:func:`verify_tag`), split over the ranks that load: a truncated,
corrupted or missing file is named in one line, before any byte of it is used.

``python -m megalm.checkpoint inspect`` and the writer thread use it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megalm.config import ConfigError
from megalm.data.shards import sha256_file

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
DONE_DIR = ".done"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as given; the message names the file and the fix."""


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and wait until it is on the disk (flush + fsync)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write_synced(tmp, text.encode())
    os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    """Flush a file written by a library (safetensors, torch.save) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: Path) -> dict[str, int | str]:
    """``{"size", "sha256"}`` of a file as it is on disk (after :func:`fsync_file`)."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_done_marker(tag_dir: Path, rank: int, entries: dict[str, dict]) -> None:
    """This rank's files are on disk: ``entries`` maps tag-relative paths to :func:`file_entry`."""
    done = tag_dir / DONE_DIR
    done.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done / f"rank_{rank:05d}.json", json.dumps(entries, sort_keys=True))


def done_ranks(tag_dir: Path) -> set[int]:
    """Ranks whose done marker is present."""
    done = tag_dir / DONE_DIR
    if not done.is_dir():
        return set()
    return {int(p.stem.split("_")[1]) for p in done.glob("rank_*.json")}


def publish_manifest(tag_dir: Path, world_size: int) -> dict[str, dict]:
    """Rank 0: merge every rank's done marker into ``manifest.json`` (atomically)."""
    files: dict[str, dict] = {}
    for rank in range(world_size):
        files.update(json.loads((tag_dir / DONE_DIR / f"rank_{rank:05d}.json").read_text()))
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))
    return files


def read_manifest(tag_dir: Path) -> dict[str, dict]:
    """The ``files`` table of a tag's manifest.

    Raises:
        CheckpointError: the manifest is missing or unreadable.
    """
    path = tag_dir / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a table")
        return files
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{tag_dir}' has no {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"'{path}' is unreadable ({type(e).__name__}: {e})") from None


def check_file(tag_dir: Path, name: str, want: dict) -> str | None:
    """Why file ``name`` of the tag does not match its manifest entry, or ``None``."""
    path = tag_dir / name
    if not path.is_file():
        return f"'{path}' is missing"
    size = path.stat().st_size
    if size != want["size"]:
        return f"'{path}' is truncated or overwritten ({size} bytes, the manifest says {want['size']})"
    if sha256_file(path) != want["sha256"]:
        return f"'{path}' is corrupted (sha256 differs from the manifest)"
    return None


def verify_tag(tag_dir: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """This rank's share of the check of every file of a tag (file ``i`` by rank ``i % world``);
    the first problem found, or ``None``. With the defaults, one process checks every file."""
    try:
        files = read_manifest(tag_dir)
    except CheckpointError as e:
        return str(e)
    for i, name in enumerate(sorted(files)):
        if i % world_size == rank:
            problem = check_file(tag_dir, name, files[name])
            if problem is not None:
                return problem
    return None


def tag_bytes(tag_dir: Path) -> dict[str, int]:
    """Bytes per kind of file in a tag's manifest (``model``, ``optim``, ``rng``, ``meta``...)."""
    sizes: dict[str, int] = {}
    for name, entry in read_manifest(tag_dir).items():
        parts = Path(name).parts
        kind = parts[0] if len(parts) > 1 else parts[0].split("_")[0].split(".")[0]
        sizes[kind] = sizes.get(kind, 0) + int(entry["size"])
    return sizes
