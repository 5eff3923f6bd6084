"""The TP x PP x DP process grid and the one object that owns its process groups.

Rank order is tp fastest, then dp, then pp (room for cp/ep later), the same
meaning as megatron-core's ``parallel_state`` (order ``tp-dp-pp``) and DeepSpeed's
``PipeModelDataParallelTopology`` (axes ``['pipe', 'data', 'model']``, last
fastest)::

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from megalm.config import ConfigError


class LayoutError(ConfigError):
    """A parallel layout that cannot be built; the message prints every factor."""


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees. ``dp`` is derived: ``world_size / (tp * pp)``."""

    tp: int
    pp: int
    dp: int

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> ParallelDims:
        """Derive ``dp``; raises :class:`LayoutError` naming every factor
        (:func:`megalm.parallel.layout.world_problem`)."""
        from megalm.parallel.layout import world_problem

        if tp < 1 or pp < 1:
            raise LayoutError(f"parallel degrees must be >= 1, got tp({tp}) pp({pp})")
        problem = world_problem(world_size, tp, pp)
        if problem is not None:
            raise LayoutError(problem.message)
        return cls(tp, pp, world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def tp_groups(self) -> list[list[int]]:
        """Ranks that share one model replica's layer shards (same dp, pp)."""
        return [
            [self.rank_of(t, d, p) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same shard and average gradients (same tp, pp)."""
        return [
            [self.rank_of(t, d, p) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(t, d, p) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)
        ]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups (tp x pp) of one data-parallel replica."""
        return [
            [self.rank_of(t, d, p) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)
        ]


class ParallelContext:
    """Creates the process groups of a :class:`ParallelDims` once and hands them out.

    Every rank must construct it (``new_group`` is collective). Groups are passed
    explicitly to layers; :meth:`as_mpu` adapts it to DeepSpeed's ``mpu``.
    ``timeout`` bounds every collective on these groups (``dist.timeout_s``), so a
    hung peer makes the others fail instead of waiting forever.
    """

    def __init__(self, dims: ParallelDims, timeout: timedelta | None = None) -> None:
        if dist.get_world_size() != dims.world_size:
            raise LayoutError(
                f"tp({dims.tp}) * pp({dims.pp}) * dp({dims.dp}) = {dims.world_size} != "
                f"world_size({dist.get_world_size()})"
            )
        self.dims, self.timeout = dims, timeout
        self.rank = dist.get_rank()
        self.tp_rank, self.dp_rank, self.pp_rank = dims.coords(self.rank)
        self.tp_group = self._mine(dims.tp_groups())
        self.dp_group = self._mine(dims.dp_groups())
        self.pp_group = self._mine(dims.pp_groups())
        self.mp_group = self._mine(dims.mp_groups())

    def _mine(self, groups: list[list[int]]) -> dist.ProcessGroup:
        mine = None
        for ranks in groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = group
        return mine

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def dp(self) -> int:
        return self.dims.dp

    def as_mpu(self) -> _DeepSpeedMPU:
        """The ``mpu`` object DeepSpeed's ``initialize`` expects (data/model-parallel groups)."""
        return _DeepSpeedMPU(self)


class _DeepSpeedMPU:
    """DeepSpeed's model-parallel-unit interface over a :class:`ParallelContext`."""

    def __init__(self, ctx: ParallelContext) -> None:
        self._c = ctx

    def get_model_parallel_rank(self) -> int:
        return self._c.tp_rank + self._c.tp * self._c.pp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._c.dims.tp * self._c.dims.pp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._c.mp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self._c.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._c.dims.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._c.tp_group

    def get_data_parallel_rank(self) -> int:
        return self._c.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._c.dims.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._c.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._c.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._c.dims.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._c.pp_group
