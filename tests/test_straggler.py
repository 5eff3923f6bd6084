"""Straggler reporting: each rank's own work per step, gathered at log steps; slow ranks named."""

from __future__ import annotations

import itertools

import torch

from megalm.train.stragglers import StepClock, find_stragglers, gather_hosts, gather_step_times
from tests.distributed import run_distributed


def test_step_clock_counts_forwards_and_backwards_before_the_boundary_and_the_data_wait():
    ticks = itertools.count()
    clock = StepClock(accum=2, clock=lambda: float(next(ticks)))  # every phase lasts 1 "second"
    for _ in range(2):  # two steps of 2 micro-batches: fwd, bwd, fwd, bwd(boundary, waits for peers)
        for phase in ("forward", "backward", "optimizer", "forward", "backward", "optimizer"):
            with clock.phase(phase):
                pass
        clock.end_step(data_s=0.5, step_s=100.0)
    assert clock.take() == 3.5  # 2 forwards + 1 backward + 0.5 data per step
    pipeline = StepClock(accum=4)  # no phases reported: the whole step counts
    pipeline.end_step(data_s=0.25, step_s=2.0)
    assert pipeline.take() == 2.25 and pipeline.take() == 0.0


def test_a_rank_slower_than_factor_times_the_median_is_named_with_its_host():
    hosts = ["a", "a", "b", "b"]
    slow = find_stragglers([0.10, 0.11, 0.10, 0.31], 1.5, hosts)
    assert slow == [{"rank": 3, "host": "b", "step_time_s": 0.31, "x_median": 2.95}]
    assert find_stragglers([0.10, 0.11, 0.10, 0.31], 0.0, hosts) == []  # off
    assert find_stragglers([0.1, 0.1, 0.1, 0.14], 1.5, hosts) == []


def _gather(rank: int, world: int) -> tuple[list[str], list[dict]]:
    times = gather_step_times([0.1, 0.1, 0.5][rank], torch.device("cpu")).tolist()
    hosts = gather_hosts()
    return hosts, find_stragglers(times, 1.5, hosts)


def test_every_rank_gathers_every_rank_step_time_and_host():
    results = run_distributed(3, _gather)
    hosts, slow = results[0]
    assert all(r == results[0] for r in results) and len(hosts) == 3
    assert [s["rank"] for s in slow] == [2] and slow[0]["x_median"] == 5.0
