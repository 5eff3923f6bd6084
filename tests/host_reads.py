"""Host reads per training step in a launched run (issue: no host synchronisation in the step).

``host_read_env(dir)`` is :func:`tests.conftest.subprocess_env` with the counter of
``tests/host_reads/sitecustomize.py`` switched on; ``assert_host_reads(dir, ...)`` then checks
every rank: exactly one read per optimizer step (the health verdict of
:mod:`megalm.train.health`, which must be known before the weights change) and at most one
per log record (the interval's last gradient norm), and none anywhere else in the step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import ROOT, subprocess_env

COUNTER_DIR = ROOT / "tests" / "host_reads"


def reads_dir(run_dir: Path) -> Path:
    """Where the counts of the run in ``run_dir`` go: a sibling directory (the run directory
    itself stays the trainer's)."""
    return run_dir.with_name(run_dir.name + "-host-reads")


def host_read_env(out: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default :func:`subprocess_env`) plus the counter, writing into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(env or subprocess_env())
    env["PYTHONPATH"] = os.pathsep.join([str(COUNTER_DIR), env.get("PYTHONPATH", "")])
    env["MEGALM_HOST_READS"] = str(out)
    return env


def assert_host_reads(out: Path, ranks: int, steps: int, log_records: int) -> dict:
    """Every one of ``ranks`` ranks read exactly ``steps`` values inside the steps and at most
    ``log_records`` at the log steps. Returns rank 0's record (counts and call sites)."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    records = [r for r in records if r["counts"].get("step")]
    assert len(records) == ranks, records
    for r in records:
        step_sites = {s: n for s, n in r["sites"].items() if s.startswith("step ")}
        assert r["counts"]["step"] == steps, f"rank {r['rank']}: {step_sites}"
        assert len(step_sites) == 1 and "megalm/train/health.py" in next(iter(step_sites)), step_sites
        assert r["counts"].get("log", 0) <= log_records, r["sites"]
    print("host reads (rank 0):", records[0]["counts"])
    return records[0]
