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

A remote data set (``data.dir`` an ``http(s)://``, ``s3://``, ``gs://`` or ``pipe:``
location, :mod:`megalm.data.remote`) is read the same way once its files are in
the node's :class:`~megalm.data.cache.ShardCache`: the manifest, tokenizer and
index sidecars are fetched when the split is opened, a shard only when a window
first needs it (or the loader prefetches it), so each rank fetches only the shards
its windows read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from megalm.data.cache import TOUCH_EVERY_S, ShardCache
from megalm.data.errors import CorruptFile, DataError, FetchError
from megalm.data.remote import file_url, is_remote, read_bytes

Policy = Literal["raise", "skip"]
SUFFIX = ".ids.npy"


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
    """What ``data_tools.preprocess`` wrote: shard list, dtype and tokenizer facts.

    ``root`` is a local directory, or the URL of a remote one; then ``cache`` is the
    node-local cache its files are fetched into, and ``tokenizer_file`` the cached copy.
    """

    root: Path | str
    shards: list[dict]
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_file: Path
    tokenizer_sha256: str = ""
    cache: ShardCache | None = None

    def split(self, name: str) -> list[dict]:
        """The shard entries of one split (``train`` or ``val``)."""
        return [s for s in self.shards if s["split"] == name]

    def location(self, name: str) -> str:
        """The path or URL of file ``name`` of this data set, as messages show it."""
        return file_url(self.root, name) if self.cache is not None else str(Path(self.root) / name)


HINT = "build it with `make data` or `python -m data_tools.preprocess --output DIR ...`"


def load_manifest(root: str | Path, data=None) -> Manifest:
    """Load ``root/manifest.json`` (shard files are checked when a split is opened).

    ``root`` may be a remote location (:mod:`megalm.data.remote`); ``data`` (a
    ``DataConfig``) then gives the cache settings (``data.cache_dir``, ``data.cache_gb``,
    ``data.fetch_retries``; defaults when ``None``) and the tokenizer is fetched.

    Raises:
        DataError: missing directory, a file instead of a directory, missing or
            malformed manifest, an unreachable remote location.
    """
    if is_remote(root):
        return _load_remote(root, data)
    root = Path(root)
    path = root / "manifest.json"
    if root.is_file():
        raise DataError(
            f"data directory '{root}' is a file, not a directory; set data.dir to the directory "
            "data_tools.preprocess wrote (the one holding manifest.json)"
        )
    if not root.is_dir():
        raise DataError(f"data directory '{root}' does not exist; {HINT} and set data.dir")
    if not path.is_file():
        raise DataError(f"no manifest.json in data directory '{root}'; {HINT}")
    return _parse(path.read_bytes(), str(path), root, None)


def _load_remote(root: str, data) -> Manifest:
    cache = ShardCache.from_config(data)
    url = file_url(root, "manifest.json")
    try:
        text = read_bytes(url, cache.retries)
    except FetchError as e:
        if not e.missing:
            raise
        raise DataError(
            f"no manifest.json at {url}; data.dir must be the URL of a whole directory written "
            "by data_tools.preprocess (upload it with your storage's own tools)"
        ) from None
    return _parse(text, url, root, cache)


def _parse(text: bytes, where: str, root: Path | str, cache: ShardCache | None) -> Manifest:
    try:
        m = json.loads(text)
        tok = m["tokenizer"]
        facts = (m["shards"], m["dtype"], tok["vocab_size"], tok["eos_id"])
        names = [tok["file"], *(s["file"] for s in m["shards"])]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{where} is malformed ({e!r}); regenerate it with data_tools.preprocess") from e
    if cache is None:
        return Manifest(root, *facts, root / tok["file"], tok.get("sha256", ""))
    for name in names:
        file_url(root, name)  # every name a plain file name, before anything is fetched
    tok_file = cache.get(file_url(root, tok["file"]), tok["file"], tok.get("sha256"), "meta")
    return Manifest(root, *facts, tok_file, tok.get("sha256", ""), cache)


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

    A remote split fetches only its index sidecars here; a shard is fetched when a
    document of it is first read or :meth:`prefetch` asks for it. Under
    ``on_bad_data=skip`` every shard is fetched and checked here instead: what is
    skipped changes the global order, so every rank must decide it up front, alike,
    without talking to the others (the node cache still fetches each shard once).

    Args:
        manifest: the loaded manifest.
        split: ``train`` or ``val``.
        bad: policy and skip record (``skip`` leaves out bad shards/documents and counts them).
        verify: check each local shard's sha256 against the manifest before using it
            (remote shards are always checked, when they are fetched).
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
        self.remote = manifest.cache is not None
        self.bad = bad or BadData()
        self.dtype = np.dtype(manifest.dtype)
        exclude = exclude or {"shards": [], "documents": []}
        self.entries: list[dict] = []  # the manifest entries of the shards in use
        shard_ids, offsets, lengths = [], [], []
        listed = manifest.split(split)
        wanted = [s for s in listed if s["file"] not in exclude["shards"]]
        self.bad.skipped["shards"] += [s["file"] for s in listed if s["file"] in exclude["shards"]]
        if self.remote:
            for shard in wanted:  # fetch the sidecars in parallel
                manifest.cache.prefetch(*self._sidecar(shard), "meta")
        for shard in wanted:
            index = self._open_remote_shard(shard) if self.remote else self._open_shard(shard, verify)
            if index is None:
                continue
            shard_ids.append(np.full(len(index), len(self.entries), dtype=np.int32))
            offsets.append(index[:, 0])
            lengths.append(index[:, 1])
            self.entries.append(shard)
        self.shard_of = np.concatenate(shard_ids) if shard_ids else np.empty(0, np.int32)
        self.offsets = np.concatenate(offsets) if offsets else np.empty(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        self._maps: dict[int, np.memmap] | None = None
        self._asked: dict[int, float] = {}  # remote shard -> when prefetch last asked the cache for it

    @property
    def files(self) -> list[Path]:
        """The local files of the shards in use (remote: their place in the cache)."""
        m = self.manifest
        if not self.remote:
            return [Path(m.root) / s["file"] for s in self.entries]
        return [m.cache.path(m.location(s["file"]), s["file"], s["sha256"]) for s in self.entries]

    def reopen(self, exclude: dict[str, list[str]]) -> ShardDocuments:
        """The same split and settings with the shards in ``exclude["shards"]`` left out."""
        return ShardDocuments(self.manifest, self.split, BadData(self.bad.policy), self.verify, exclude)

    def _open_shard(self, shard: dict, verify: bool) -> np.ndarray | None:
        path = Path(self.manifest.root) / shard["file"]
        where = f"shard '{path}'"
        if not path.is_file():
            self.bad(
                "shards",
                shard["file"],
                f"{where} is listed in {self.manifest.location('manifest.json')} "
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
        try:
            index = np.load(sidecar, allow_pickle=False) if sidecar.is_file() else scan_shard(path, self.bad)
        except DataError as e:
            self.bad("shards", shard["file"], str(e))
            return None
        return self._checked(index, shard, path.stat().st_size)

    def _sidecar(self, shard: dict) -> tuple[str, str, str | None]:
        name = shard["file"] + ".index.npy"
        return self.manifest.location(name), name, shard.get("index_sha256")

    def _open_remote_shard(self, shard: dict) -> np.ndarray | None:
        """The index of a remote shard: its sidecar, or a scan of the fetched shard without one."""
        try:
            if self.bad.policy == "skip":
                self._fetch(shard)
            try:
                index = np.load(self.manifest.cache.get(*self._sidecar(shard), "meta"), allow_pickle=False)
            except FetchError as e:
                if not e.missing:
                    raise
                index = scan_shard(self._fetch(shard), self.bad)
        except (CorruptFile, FetchError) as e:
            if isinstance(e, FetchError) and not e.missing:
                raise  # a transfer fault is never a reason to change the data
            self.bad("shards", shard["file"], str(e))
            return None
        return self._checked(index, shard, shard.get("bytes"))

    def _checked(self, index: np.ndarray, shard: dict, size: int | None) -> np.ndarray | None:
        """``index`` if it fits in ``size`` bytes (when known) and counts the manifest's documents."""
        where = f"shard '{self.manifest.location(shard['file'])}'"
        end = int((index[:, 0] + index[:, 1] * self.dtype.itemsize).max()) if len(index) else 0
        if size is not None and end > size:
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

    def _fetch(self, shard: dict) -> Path:
        """The cached copy of a remote shard (fetched and verified now if needed)."""
        m = self.manifest
        return m.cache.get(m.location(shard["file"]), shard["file"], shard["sha256"])

    def prefetch(self, first: int, stop: int) -> None:
        """Fetch in the background the remote shards that documents ``[first, stop)`` live in.

        A shard asked for in the last few seconds is not asked for again (the loader
        calls this for every window; the cache only needs to hear of each use now and then).
        """
        if not self.remote:
            return
        m, now = self.manifest, time.monotonic()
        for s in {int(s) for s in self.shard_of[first:stop]}:
            if now - self._asked.get(s, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                continue
            self._asked[s] = now
            name = self.entries[s]["file"]
            m.cache.prefetch(m.location(name), name, self.entries[s]["sha256"])

    def __len__(self) -> int:
        return len(self.lengths)

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s token ids (a read-only view into the memory-mapped shard)."""
        s = int(self.shard_of[i])
        mm = self._maps.get(s) if self._maps is not None else None
        if mm is None:
            mm = self._map(s)
        return np.frombuffer(mm, dtype=self.dtype, count=int(self.lengths[i]), offset=int(self.offsets[i]))

    def _map(self, s: int) -> np.memmap:
        """Memory-map shard ``s``; opened lazily, i.e. after a DataLoader worker starts, not before.

        Local shards are all mapped at the first read, so a run keeps reading the set it
        opened even if ``preprocess --overwrite`` replaces the directory meanwhile.
        A remote one is fetched if needed; maps of shards the cache has evicted are let go.
        """
        if self._maps is None:
            self._maps = {}
            if not self.remote:
                self._maps = {k: np.memmap(f, dtype=np.uint8, mode="r") for k, f in enumerate(self.files)}
                return self._maps[s]
        self._maps = {k: mm for k, mm in self._maps.items() if os.path.exists(mm.filename)}
        try:
            self._maps[s] = np.memmap(self._fetch(self.entries[s]), dtype=np.uint8, mode="r")
        except FileNotFoundError:  # evicted by another rank between the fetch and the map
            self._maps[s] = np.memmap(self._fetch(self.entries[s]), dtype=np.uint8, mode="r")
        return self._maps[s]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_asked": {}}


def read_documents(manifest: Manifest, split: str, verify: bool = True) -> list[np.ndarray]:
    """All documents of ``split`` as token-id arrays, in manifest order (small data and tools only).

    Raises:
        DataError: a missing, truncated or corrupt shard.
    """
    docs = ShardDocuments(manifest, split, verify=verify)
    return [np.array(docs.document(i)) for i in range(len(docs))]
