"""Process grid, tensor/sequence-parallel layers and collectives."""

from megalm.parallel.grid import LayoutError, ParallelContext, ParallelDims
from megalm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "LayoutError",
    "ParallelContext",
    "ParallelDims",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
]
