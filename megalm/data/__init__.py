"""Token shards -> packed windows -> per-rank micro-batches (see ``loader.py`` for the stages)."""

from megalm.data.build import open_split, open_train_batches
from megalm.data.loader import TrainBatches, eval_batches
from megalm.data.order import BlendSchedule, GlobalOrderSampler
from megalm.data.packed import InMemoryDocuments, PackedWindows
from megalm.data.shards import (
    BadData,
    DataError,
    Manifest,
    ShardDocuments,
    load_manifest,
    read_documents,
    scan_shard,
    sha256_file,
)

__all__ = [
    "BadData",
    "BlendSchedule",
    "DataError",
    "GlobalOrderSampler",
    "InMemoryDocuments",
    "Manifest",
    "PackedWindows",
    "ShardDocuments",
    "TrainBatches",
    "eval_batches",
    "load_manifest",
    "open_split",
    "open_train_batches",
    "read_documents",
    "scan_shard",
    "sha256_file",
]
