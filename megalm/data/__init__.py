"""Token shards -> packed windows -> per-rank micro-batches (see ``loader.py`` for the stages).

Names are imported on first use, so torch-free parts (``megalm.data.shards``: manifest,
shard index, checksums) load without torch, e.g. in preprocessing worker processes.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TrainBatches": "loader",
    "eval_batches": "loader",
    "BlendSchedule": "order",
    "GlobalOrderSampler": "order",
    "InMemoryDocuments": "packed",
    "PackedWindows": "packed",
    "BadData": "shards",
    "CorruptFile": "errors",
    "DataError": "errors",
    "FetchError": "errors",
    "ShardCache": "cache",
    "Manifest": "shards",
    "ShardDocuments": "shards",
    "load_manifest": "shards",
    "read_documents": "shards",
    "scan_shard": "shards",
    "sha256_file": "shards",
    "open_split": "build",
    "open_train_batches": "build",
    "parse_blend": "build",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'megalm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megalm.data.{_WHERE[name]}"), name)
