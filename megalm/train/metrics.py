"""Throughput, MFU, memory, and the ``metrics.jsonl`` log.

MFU = achieved model FLOP/s per device / peak dense FLOP/s per device
(Chowdhery et al. 2022, appendix B), with model FLOPs from
:func:`megalm.model.flops_per_token` (non-causal attention convention, no
recompute counted). The peak is the dense bf16 table value on known GPUs (never
the 2:4-sparsity figure) and a measured fp32 matmul rate on CPU.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

# Dense (not sparse) bf16 tensor-core peak per device, FLOP/s, from vendor datasheets.
GPU_PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A800": 312e12}


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 10) -> float:
    """Best fp32 matmul FLOP/s (``2 n^3`` per product) with this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name}: dense bf16 datasheet peak"
        measured = measure_cuda_peak_flops(device)
        return measured, f"{name}: measured bf16 matmul"
    return (
        measure_cpu_peak_flops(),
        f"CPU: measured fp32 matmul with {torch.get_num_threads()} threads",
    )


def measure_cuda_peak_flops(device: torch.device, n: int = 8192) -> float:
    """Best bf16 matmul FLOP/s on an unlisted GPU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak, or this process's max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            pass

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step`` so a resumed run does not log steps twice."""
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
