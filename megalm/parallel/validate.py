"""Layout checks that run before any process group exists."""

from __future__ import annotations

from megalm.config import ConfigError, ModelConfig, ParallelConfig
from megalm.model.layers import ffn_hidden_size
from megalm.parallel.grid import ParallelDims


def validate_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> ParallelDims:
    """Check that ``model`` can be split as ``parallel`` says on ``world_size`` ranks.

    Returns:
        The :class:`ParallelDims` (with the derived ``dp``).

    Raises:
        ConfigError: naming the offending values (world factorization, heads % tp,
            kv heads vs tp, MLP width % tp, seq_len % tp with sequence parallelism).
    """
    tp, pp = parallel.tp, parallel.pp
    dims = ParallelDims.from_world(world_size, tp, pp)
    kv = model.n_kv_heads or model.n_heads
    if model.n_heads % tp:
        raise ConfigError(f"model.n_heads ({model.n_heads}) must be divisible by parallel.tp ({tp})")
    if kv % tp and tp % kv:
        raise ConfigError(
            f"model.n_kv_heads ({kv}) and parallel.tp ({tp}): one must divide the other (split K/V heads "
            "when n_kv_heads >= tp, replicate them when n_kv_heads < tp)"
        )
    if ffn_hidden_size(model) % tp:
        raise ConfigError(f"MLP width ({ffn_hidden_size(model)}) must be divisible by parallel.tp ({tp})")
    if parallel.sequence_parallel and model.seq_len % tp:
        raise ConfigError(
            f"model.seq_len ({model.seq_len}) must be divisible by parallel.tp ({tp}) with "
            "parallel.sequence_parallel=true"
        )
    return dims
