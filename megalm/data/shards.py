"""Read the ``manifest.json`` + webdataset shards written by ``data_tools.preprocess``.

A shard is an uncompressed tar of ``<key>.ids.npy`` members, so a document's
token ids sit at a fixed byte offset inside the file. Each shard has a sidecar
``<shard>.index.npy``, an ``(n_docs, 2)`` int64 array of (byte offset of the
token data, token count), written at preprocessing time; the loader memory-maps
the tar and reads documents through that index, so no rank holds the corpus in
memory and start-up does not scan the data. A shard without a sidecar is
scanned once (tar headers and npy headers only).

Problems are reported by :class:`BadData`: ``raise`` turns each into a
:class:`DataError` naming the file; ``skip`` leaves the shard or document out
and counts it (the list goes into checkpoints, so a resume skips the same ones).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Policy = Literal["raise", "skip"]
SUFFIX = ".ids.npy"


class DataError(ValueError):
    """Missing, corrupt or unusable training data; the message names the file and the fix."""


@dataclass
class BadData:
    """The bad-input policy plus what it skipped: ``{"shards": [file...], "documents": ["file#i"...]}``."""

    policy: Policy = "raise"
    skipped: dict[str, list[str]] = field(default_factory=lambda: {"shards": [], "documents": []})

    def __call__(self, kind: Literal["shards", "documents"], name: str, message: str) -> None:
        """Raise ``DataError(message)`` or record ``name`` as skipped (and say so once)."""
        if self.policy == "raise":
            raise DataError(message)
        self.skipped[kind].append(name)
        print(f"warning: skipping {message.split(';')[0]} (data.on_bad_data=skip)", flush=True)


@dataclass(frozen=True)
class Manifest:
    """What ``data_tools.preprocess`` wrote: shard list, dtype and tokenizer facts."""

    root: Path
    shards: list[dict]
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_file: Path

    def split(self, name: str) -> list[dict]:
        """The shard entries of one split (``train`` or ``val``)."""
        return [s for s in self.shards if s["split"] == name]


def load_manifest(root: str | Path) -> Manifest:
    """Load ``root/manifest.json`` (shard files are checked when a split is opened).

    Raises:
        DataError: missing directory, missing or malformed manifest.
    """
    root = Path(root)
    path = root / "manifest.json"
    hint = "build it with `make data` or `python -m data_tools.preprocess --output DIR ...`"
    if not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist; {hint} and set data.dir")
    if not path.is_file():
        raise DataError(f"no manifest.json in data directory '{root}'; {hint}")
    try:
        m = json.loads(path.read_text())
        tok = m["tokenizer"]
        return Manifest(root, m["shards"], m["dtype"], tok["vocab_size"], tok["eos_id"], root / tok["file"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is malformed ({e!r}); regenerate it with data_tools.preprocess") from e


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan_shard(path: Path, bad: BadData | None = None) -> np.ndarray:
    """Build a shard's index by reading its tar and npy headers: (n_docs, 2) int64 (offset, tokens).

    Raises:
        DataError: an unreadable tar (always), or a member that is not a 1-D npy array
            (policy ``raise``; with ``skip`` the member is left out and counted).
    """
    bad = bad or BadData()
    rows = []
    try:
        with tarfile.open(path, "r:") as tf, open(path, "rb") as f:
            for member in tf:
                if not member.isfile():
                    continue
                if not member.name.endswith(SUFFIX):
                    bad(
                        "documents",
                        f"{path.name}#{member.name}",
                        f"member '{member.name}' of shard '{path}' is not a {SUFFIX} document; "
                        "re-run data_tools.preprocess",
                    )
                    continue
                f.seek(member.offset_data)
                try:
                    np.lib.format.read_magic(f)
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                    if len(shape) != 1 or f.tell() - member.offset_data > member.size:
                        raise ValueError(f"shape {shape}")
                except ValueError as e:
                    bad(
                        "documents",
                        f"{path.name}#{member.name}",
                        f"document '{member.name}' of shard '{path}' fails to decode ({e}); "
                        "re-run data_tools.preprocess",
                    )
                    continue
                rows.append((f.tell(), shape[0]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard '{path}' cannot be read ({e}); re-run data_tools.preprocess") from e
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class ShardDocuments:
    """The documents of one split, read through memory maps; nothing is loaded up front.

    Args:
        manifest: the loaded manifest.
        split: ``train`` or ``val``.
        bad: policy and skip record (``skip`` leaves out bad shards/documents and counts them).
        verify: check each shard's sha256 against the manifest before using it.
        exclude: shard files / ``file#key`` documents to leave out (a checkpoint's skip list).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        bad: BadData | None = None,
        verify: bool = True,
        exclude: dict[str, list[str]] | None = None,
    ) -> None:
        self.manifest, self.split, self.verify = manifest, split, verify
        self.bad = bad or BadData()
        self.dtype = np.dtype(manifest.dtype)
        exclude = exclude or {"shards": [], "documents": []}
        self.files: list[Path] = []
        shard_ids, offsets, lengths = [], [], []
        for shard in manifest.split(split):
            if shard["file"] in exclude["shards"]:
                self.bad.skipped["shards"].append(shard["file"])
                continue
            index = self._open_shard(shard, verify)
            if index is None:
                continue
            shard_ids.append(np.full(len(index), len(self.files), dtype=np.int32))
            offsets.append(index[:, 0])
            lengths.append(index[:, 1])
            self.files.append(manifest.root / shard["file"])
        self.shard_of = np.concatenate(shard_ids) if shard_ids else np.empty(0, np.int32)
        self.offsets = np.concatenate(offsets) if offsets else np.empty(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        self._maps: list[np.memmap] | None = None

    def reopen(self, exclude: dict[str, list[str]]) -> ShardDocuments:
        """The same split and settings with the shards in ``exclude["shards"]`` left out."""
        return ShardDocuments(self.manifest, self.split, BadData(self.bad.policy), self.verify, exclude)

    def _open_shard(self, shard: dict, verify: bool) -> np.ndarray | None:
        path = self.manifest.root / shard["file"]
        where = f"shard '{path}'"
        if not path.is_file():
            self.bad(
                "shards",
                shard["file"],
                f"{where} is listed in {self.manifest.root / 'manifest.json'} "
                "but missing; re-run data_tools.preprocess or restore the file",
            )
            return None
        if verify and sha256_file(path) != shard["sha256"]:
            self.bad(
                "shards",
                shard["file"],
                f"{where} fails its sha256 check (corrupt or replaced); re-run data_tools.preprocess",
            )
            return None
        sidecar = path.with_name(path.name + ".index.npy")
        if sidecar.is_file():
            index = np.load(sidecar, allow_pickle=False)
        else:
            try:
                index = scan_shard(path, self.bad)
            except DataError as e:
                self.bad("shards", shard["file"], str(e))
                return None
        itemsize = self.dtype.itemsize
        size = path.stat().st_size
        if len(index) and int((index[:, 0] + index[:, 1] * itemsize).max()) > size:
            self.bad(
                "shards",
                shard["file"],
                f"{where} cannot be read (truncated: its index points past "
                f"{size} bytes); re-run data_tools.preprocess",
            )
            return None
        expected = shard["documents"] - sum(
            d.startswith(f"{shard['file']}#") for d in self.bad.skipped["documents"]
        )
        if len(index) != expected:
            self.bad(
                "shards",
                shard["file"],
                f"{where} holds {len(index)} documents, the manifest says "
                f"{shard['documents']}; re-run data_tools.preprocess",
            )
            return None
        return index

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s token ids (a read-only view into the memory-mapped shard)."""
        if self._maps is None:  # opened lazily: after a DataLoader worker fork, not before
            self._maps = [np.memmap(f, dtype=np.uint8, mode="r") for f in self.files]
        mm = self._maps[self.shard_of[i]]
        return np.frombuffer(mm, dtype=self.dtype, count=int(self.lengths[i]), offset=int(self.offsets[i]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}


def read_documents(manifest: Manifest, split: str, verify: bool = True) -> list[np.ndarray]:
    """All documents of ``split`` as token-id arrays, in manifest order (small data and tools only).

    Raises:
        DataError: a missing, truncated or corrupt shard.
    """
    docs = ShardDocuments(manifest, split, verify=verify)
    return [np.array(docs.document(i)) for i in range(len(docs))]
