"""Accelerators: the one table of peaks, memory and bandwidths, and the peak a run divides by.

Sources (dense bf16 tensor-core peaks, never the 2:4-sparsity figure): NVIDIA A100
datasheet (312 TFLOP/s; 80 GB at 2.0 TB/s, 40 GB at 1.555 TB/s), A800 = A100 with
400 GB/s NVLink, H100 SXM datasheet (989 TFLOP/s; 80 GB at 3.35 TB/s), H800 = H100
with 400 GB/s NVLink, H200 SXM datasheet (989 TFLOP/s; 141 GB at 4.8 TB/s). NVLink
per GPU, both directions: A100 600 GB/s, H100/H200 900 GB/s (half each way is used
for a ring). Inter-node: 8 x 200 Gb/s HDR InfiniBand per A100 node (Selene,
Narayanan et al. 2021 sec. 5) = 25 GB/s per GPU; 8 x 400 Gb/s NDR per H100/H200
node = 50 GB/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    """One accelerator: dense bf16 peak, HBM size and bandwidth, interconnect bandwidths."""

    name: str
    peak_flops: float  # dense bf16, FLOP/s
    memory_bytes: float
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # one direction, per GPU (NVLink)
    inter_node_bytes_per_s: float  # one direction, per GPU (InfiniBand)
    gpus_per_node: int = 8


DEVICES: dict[str, Device] = {
    "a100": Device("A100-SXM4-80GB", 312e12, 80e9, 2.0e12, 300e9, 25e9),
    "a100-40gb": Device("A100-SXM4-40GB", 312e12, 40e9, 1.555e12, 300e9, 25e9),
    "a800": Device("A800-SXM4-80GB", 312e12, 80e9, 2.0e12, 200e9, 25e9),
    "h100": Device("H100-SXM5-80GB", 989e12, 80e9, 3.35e12, 450e9, 50e9),
    "h800": Device("H800-SXM5-80GB", 989e12, 80e9, 3.35e12, 200e9, 50e9),
    "h200": Device("H200-SXM-141GB", 989e12, 141e9, 4.8e12, 450e9, 50e9),
}


def known_device(cuda_name: str) -> Device | None:
    """The table entry whose model number appears in ``torch.cuda.get_device_name()``
    (``"NVIDIA H100 80GB HBM3"`` -> h100), or ``None``."""
    name = cuda_name.upper()
    for key in ("A100", "A800", "H100", "H800", "H200"):
        if key in name:
            return DEVICES[key.lower()]
    return None


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


def measure_cuda_peak_flops(device: torch.device, n: int = 8192) -> float:
    """Best bf16 matmul FLOP/s on a GPU missing from :data:`DEVICES`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from): the datasheet value of a known
    GPU, else a measured bf16 matmul rate; on CPU a measured fp32 matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = known_device(name)
        if known is not None:
            return known.peak_flops, f"{name}: dense bf16 datasheet peak"
        return measure_cuda_peak_flops(device), f"{name}: measured bf16 matmul"
    return measure_cpu_peak_flops(), f"CPU: measured fp32 matmul with {torch.get_num_threads()} threads"
