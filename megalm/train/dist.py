"""Process-group start-up for every launcher megalm supports.

- plain ``python``: no launcher variables -> a world of one on a free local port;
- ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
- ``deepspeed``: the same variables, plus a ``--local_rank`` argument that
  ``launch/pretrain.py`` accepts and ignores.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from megalm.config import Config


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launcher: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launcher(env: dict[str, str] | os._Environ = os.environ) -> str:
    """``deepspeed``, ``torchrun`` or ``python`` from the environment the launcher left."""
    if "RANK" not in env:
        return "python"
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        return "torchrun"
    return "deepspeed"


def init_distributed(cfg: Config) -> DistInfo:
    """Start the default process group (gloo on CPU, NCCL on CUDA) via DeepSpeed.

    Also gives each local rank its share of the CPU threads when the launcher did
    not set ``OMP_NUM_THREADS``, so ranks on one machine do not oversubscribe it.
    """
    import deepspeed

    # DeepSpeed's ZeRO calls a torch collective that torch >= 2.10 flags on every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    launcher = detect_launcher()
    if launcher == "python":
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    cuda = torch.cuda.is_available()
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=cfg.dist.timeout_s),
        )
    return DistInfo(
        torch_dist.get_rank(),
        torch_dist.get_world_size(),
        local_rank,
        local_world,
        device,
        backend,
        launcher,
    )
