"""Token shards -> packed windows -> per-rank micro-batches."""

from megalm.data.packed import GlobalOrderSampler, PackedWindows, TrainBatches, eval_batches
from megalm.data.shards import DataError, Manifest, load_manifest, read_documents

__all__ = [
    "DataError",
    "GlobalOrderSampler",
    "Manifest",
    "PackedWindows",
    "TrainBatches",
    "eval_batches",
    "load_manifest",
    "read_documents",
]
