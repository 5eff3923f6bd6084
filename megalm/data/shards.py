"""Read the ``manifest.json`` + webdataset shards written by ``data_tools.preprocess``."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds


class DataError(ValueError):
    """Missing, corrupt or unusable training data; the message names the file and the fix."""


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
    """Load and check ``root/manifest.json``.

    Raises:
        DataError: missing directory/manifest, or a listed shard that is missing.
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
        manifest = Manifest(root, m["shards"], m["dtype"], tok["vocab_size"], tok["eos_id"],
                            root / tok["file"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is malformed ({e!r}); regenerate it with data_tools.preprocess") from e
    for shard in manifest.shards:
        if not (root / shard["file"]).is_file():
            raise DataError(f"shard '{root / shard['file']}' is listed in {path} but missing; "
                            "re-run data_tools.preprocess or restore the file")
    return manifest


def read_documents(manifest: Manifest, split: str, verify: bool = True) -> list[np.ndarray]:
    """All documents of ``split`` as token-id arrays, in manifest order.

    Raises:
        DataError: checksum mismatch, unreadable tar, or an empty split.
    """
    docs: list[np.ndarray] = []
    for shard in manifest.split(split):
        path = manifest.root / shard["file"]
        if verify:
            h = hashlib.sha256(path.read_bytes()).hexdigest()
            if h != shard["sha256"]:
                raise DataError(f"shard '{path}' fails its sha256 check (corrupt or replaced); "
                                "re-run data_tools.preprocess")
        before = len(docs)
        try:
            # A bare pipeline (no node/worker splitting): megalm splits samples itself by
            # (dp_rank, dp_size); WebDataset's default splitter would read the global RANK.
            for sample in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()):
                docs.append(np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False))
        except Exception as e:  # tarfile/numpy errors for truncated or corrupt shards
            raise DataError(f"shard '{path}' cannot be read ({e}); re-run data_tools.preprocess") from e
        if len(docs) - before != shard["documents"]:
            raise DataError(f"shard '{path}' holds {len(docs) - before} documents, the manifest "
                            f"says {shard['documents']}; re-run data_tools.preprocess")
    return docs
