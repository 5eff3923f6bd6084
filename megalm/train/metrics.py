"""The ``metrics.jsonl`` log (and TensorBoard), and peak memory.

What goes into a record is decided by :mod:`megalm.train.progress`; MFU comes from
:func:`megalm.perf.flops.utilization`, the benchmark's function.
"""

from __future__ import annotations

import importlib.util
import json
import resource
from pathlib import Path
from typing import Any

import torch

from megalm.checkpoint.manifest import atomic_write_text
from megalm.config import Config, ConfigError


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak, or this process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def check_tensorboard(cfg: Config) -> None:
    """``run.tensorboard=true`` needs the ``tensorboard`` extra: one error line before anything
    starts (every rank checks, so none waits for rank 0)."""
    if cfg.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "run.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
            "(or set run.tensorboard=false)"
        )


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:  # run.tensorboard; importable (check_tensorboard ran at start-up)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step`` so a resumed run does not log steps twice, and repair
        a torn last line (a kill mid-write): dropped and noted, never a reason to refuse."""
        if not self.path.exists():
            return
        records, torn = parse_metrics(self.path.read_text(errors="replace"))
        for line_no, text in torn:
            print(
                f"metrics | dropped unreadable line {line_no} of {self.path} ({len(text)} characters, "
                "a record torn by a kill mid-write)",
                flush=True,
            )
        keep = [json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(keep))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """``metrics.jsonl`` text -> (records, [(1-based line number, text) of unreadable lines])."""
    records, torn = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn.append((i, line))
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append((i, line))
    return records, torn


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All readable records of a ``metrics.jsonl`` (a torn last line from a kill is left out)."""
    return parse_metrics(path.read_text(errors="replace"))[0]
