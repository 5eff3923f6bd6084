"""The TP x CP x DP x PP process grid and the one object that owns its process groups.

Rank order is tp fastest, then cp, then dp, then pp: megatron-core's ``parallel_state``
order ``tp-cp-ep-dp-pp`` (``RankGenerator``, ep = 1) and DeepSpeed's
``PipeModelDataParallelTopology`` (axes ``['pipe', 'data', 'model']``, last fastest) with
its data axis covering cp x dp (``data = cp_rank + cp * dp_rank``)::

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Context-parallel ranks hold the same weights and different pieces of each sequence, so
the gradient reduction (and ZeRO's partitioning) spans dp x cp: the group DeepSpeed is
handed as "data parallel" (megatron-core's ``get_data_parallel_group(
with_context_parallel=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch.distributed as dist

from megalm.config import ConfigError


class LayoutError(ConfigError):
    """A parallel layout that cannot be built; the message prints every factor."""


class Coords(NamedTuple):
    """A rank's place in the grid, fastest-varying first."""

    tp: int
    cp: int
    dp: int
    pp: int


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees. ``dp`` is derived: ``world_size / (tp * pp * cp)``."""

    tp: int
    pp: int
    dp: int
    cp: int = 1

    @classmethod
    def from_world(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> ParallelDims:
        """Derive ``dp``; raises :class:`LayoutError` naming every factor
        (:func:`megalm.parallel.layout.world_problem`)."""
        from megalm.parallel.layout import world_problem

        if tp < 1 or pp < 1 or cp < 1:
            raise LayoutError(f"parallel degrees must be >= 1, got tp({tp}) pp({pp}) cp({cp})")
        problem = world_problem(world_size, tp, pp, cp)
        if problem is not None:
            raise LayoutError(problem.message)
        return cls(tp, pp, world_size // (tp * pp * cp), cp)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def grid_coords(self, rank: int) -> Coords:
        """(tp, cp, dp, pp) coordinates of a global rank."""
        tp, cp, dp = self.tp, self.cp, self.dp
        return Coords(rank % tp, (rank // tp) % cp, (rank // (tp * cp)) % dp, rank // (tp * cp * dp))

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank (DeepSpeed's model/data/pipe when cp = 1)."""
        c = self.grid_coords(rank)
        return c.tp, c.dp, c.pp

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int = 0) -> int:
        return tp_rank + self.tp * (cp_rank + self.cp * (dp_rank + self.dp * pp_rank))

    def _groups(self, *axes: str) -> list[list[int]]:
        """Ranks that differ only along ``axes`` (each group ascending), one group per setting of
        the other axes; megatron-core's ``RankGenerator.get_ranks('-'.join(axes))``."""
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            c = self.grid_coords(rank)._asdict()
            key = tuple(c[a] for a in sizes if a not in axes)
            groups.setdefault(key, []).append(rank)
        return [groups[k] for k in sorted(groups, key=lambda k: k[::-1])]

    def tp_groups(self) -> list[list[int]]:
        """Ranks that share one model replica's layer shards (same cp, dp, pp)."""
        return self._groups("tp")

    def cp_groups(self) -> list[list[int]]:
        """Ranks that hold the pieces of the same sequences (same tp, dp, pp): the attention ring."""
        return self._groups("cp")

    def dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same shard and read different sequences (same tp, cp, pp)."""
        return self._groups("dp")

    def dp_cp_groups(self) -> list[list[int]]:
        """Ranks that average gradients: every data-parallel and context-parallel peer (same tp, pp)."""
        return self._groups("cp", "dp")

    def pp_groups(self) -> list[list[int]]:
        return self._groups("pp")

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups (tp x pp) of one data-parallel replica and sequence piece."""
        return self._groups("tp", "pp")


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
                f"tp({dims.tp}) * cp({dims.cp}) * pp({dims.pp}) * dp({dims.dp}) = {dims.world_size} != "
                f"world_size({dist.get_world_size()})"
            )
        self.dims, self.timeout = dims, timeout
        self.rank = dist.get_rank()
        self.tp_rank, self.cp_rank, self.dp_rank, self.pp_rank = dims.grid_coords(self.rank)
        self.tp_group = self._mine(dims.tp_groups())
        self.dp_group = self._mine(dims.dp_groups())
        self.pp_group = self._mine(dims.pp_groups())
        self.mp_group = self._mine(dims.mp_groups())
        # Without cp these equal tp/dp groups; created only when they differ (new_group is collective).
        self.cp_group = self._mine(dims.cp_groups()) if dims.cp > 1 else None
        self.dp_cp_group = self._mine(dims.dp_cp_groups()) if dims.cp > 1 else self.dp_group

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

    @property
    def cp(self) -> int:
        return self.dims.cp

    @property
    def dp_cp(self) -> int:
        """Ranks in :attr:`dp_cp_group`: those that average gradients."""
        return self.dims.dp * self.dims.cp

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in :attr:`dp_cp_group` (cp fastest, the group's ascending order)."""
        return self.cp_rank + self.dims.cp * self.dp_rank

    def as_mpu(self) -> _DeepSpeedMPU:
        """The ``mpu`` object DeepSpeed's ``initialize`` expects (data/model-parallel groups)."""
        return _DeepSpeedMPU(self)


class _DeepSpeedMPU:
    """DeepSpeed's model-parallel-unit interface over a :class:`ParallelContext`.

    "Data parallel" here is dp x cp (:attr:`ParallelContext.dp_cp_group`): DeepSpeed
    averages gradients over those ``dp * cp`` ranks and ZeRO partitions states over them.
    Each cp rank's loss is the mean over its ``T / cp`` tokens, so the average over cp of
    those gradients is the gradient of the mean over the whole sequence, and the average
    over dp the mean over the batch. (DeepSpeed's own sequence-parallel hooks,
    ``get_sequence_parallel_*``, are Ulysses-specific and deliberately absent.)
    """

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
        return self._c.dp_cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._c.dp_cp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._c.dp_cp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._c.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._c.dims.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self._c.pp_group
