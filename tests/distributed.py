"""``run_distributed(world_size, fn, *args)``: run a function on N gloo ranks in forked processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megalm.train.launchers import run_local_ranks
from tests.conftest import scaled_timeout


def run_distributed(world_size: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    :func:`megalm.train.launchers.run_local_ranks` with forked processes. ``fn`` must be a
    module-level function. A failure on any rank raises ``AssertionError`` carrying that
    rank's traceback. ``timeout`` (seconds per rank's answer) is scaled by
    ``MEGALM_TEST_TIMEOUT_FACTOR``.
    """
    try:
        return run_local_ranks(world_size, fn, *args, timeout=scaled_timeout(timeout), start_method="fork")
    except RuntimeError as e:
        raise AssertionError(str(e)) from None
