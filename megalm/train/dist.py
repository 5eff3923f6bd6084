"""Rank discovery for every launcher megalm supports, and process-group start-up.

``discover_ranks`` reads the environment the launcher left and returns one
``RankEnv``; ``init_distributed`` exports it as the ``env://`` variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
starts the default process group through DeepSpeed. The innermost launcher wins,
because it is the one that started this very process:

==========  =====================================  ==========================================
launcher    recognised by                          rank / world / master from
==========  =====================================  ==========================================
torchrun    ``TORCHELASTIC_RUN_ID``                RANK, WORLD_SIZE, MASTER_ADDR/PORT
deepspeed   RANK plus ``CROSS_RANK``/``LOCAL_SIZE`` the same (``--local_rank`` is ignored)
env         RANK with no launcher marker           the same (a hand-made ``env://`` setup)
mpirun      OMPI_COMM_WORLD_RANK / PMI_RANK / ...  mpi4py ``COMM_WORLD``; rank 0's host and a
                                                   free port, broadcast (DeepSpeed's
                                                   ``mpi_discovery`` recipe)
srun        SLURM_PROCID inside a step             SLURM_PROCID / SLURM_STEP_NUM_TASKS /
            (``SLURM_STEP_ID`` set)                SLURM_LOCALID; master = first host of
                                                   SLURM_STEP_NODELIST (its NodeAddr when
                                                   the name does not resolve), port from
                                                   the job id
python      none of the above                      a world of one on a free local port
==========  =====================================  ==========================================

A batch script's own shell (``sbatch`` without ``srun``) is not a step: a process
started from it is a world of one. Contradictions (RANK exported in an ``sbatch``
script that ``srun`` then starts on several tasks, RANK >= WORLD_SIZE, a launcher
marker without RANK) raise ``LaunchError`` naming the variables.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from megalm.config import Config, ConfigError
from megalm.train.ds_ops import release_shm_names
from megalm.train.launchers import free_port

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(ConfigError):
    """The launcher environment is incomplete or contradicts itself (a one-line ``error:``, exit 2)."""


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in the job, as discovered from its launcher."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    world_from: str = ""  # the launcher variables the world size was read from, for error messages

    def as_env(self) -> dict[str, str]:
        """The ``env://`` variables torch.distributed and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def describe(self) -> str:
        """One log line: launcher, rank, local rank, master."""
        return (
            f"dist   | launcher {self.launcher} | rank {self.rank}/{self.world_size} | local "
            f"{self.local_rank}/{self.local_world_size} | master {self.master_addr}:{self.master_port}"
        )


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


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise LaunchError(f"{key} is not set") from None
    except ValueError:
        raise LaunchError(f"{key}={env[key]!r} is not an integer") from None


def _in_srun_step(env: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def detect_launcher(env: Mapping[str, str] = os.environ) -> str:
    """Name the launcher that started this process.

    Returns:
        One of ``torchrun``, ``deepspeed``, ``env``, ``mpirun``, ``srun``, ``python``.
    """
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        return "deepspeed"
    if "RANK" in env:
        return "env"
    if any(k in env for k in MPI_RANK_VARS):
        # srun --mpi=pmi2/pmix also sets PMI_RANK/PMIX_RANK: then both name the same task.
        procid = env.get("SLURM_PROCID")
        if _in_srun_step(env) and all(env.get(k, procid) == procid for k in MPI_RANK_VARS):
            return "srun"
        return "mpirun"
    if _in_srun_step(env):
        return "srun"
    return "python"


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's compressed ``SLURM_STEP_TASKS_PER_NODE``.

    Example: ``"2(x3),1"`` means nodes 0-2 run 2 tasks and node 3 runs 1.
    """
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"SLURM_NODEID={node_id} but SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def _hostlist_items(nodelist: str) -> list[str]:
    """Split a hostlist at the commas and spaces outside brackets (``a[1,2],b`` -> ``a[1,2]``, ``b``)."""
    items, depth, current = [], 0, []
    for ch in nodelist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if not 0 <= depth <= 1:
            raise LaunchError(f"unbalanced brackets in the Slurm node list {nodelist!r}")
        if depth == 0 and (ch == "," or ch.isspace()):
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise LaunchError(f"unbalanced brackets in the Slurm node list {nodelist!r}")
    return [item for item in [*items, "".join(current)] if item]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """``"007-009,012"`` -> ``["007", "008", "009", "012"]``: each range is padded to the width
    of its low bound, as Slurm does (``9-11`` -> 9, 10, 11; ``01-2`` -> 01, 02)."""
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise LaunchError(f"bad range {part!r} in the Slurm node list {nodelist!r}")
        low, high = m.group(1), m.group(2) or m.group(1)
        out += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a Slurm hostlist, in the order ``scontrol show hostnames`` prints them.

    Items are separated by commas (or spaces) outside brackets; each bracket holds a list
    of numbers and ranges, and an item with several brackets is their cartesian product,
    leftmost slowest: ``node[01-04,07]``, ``gpu[007-010,012],cpu1``, ``a-b[1-2]``,
    ``rack[1-2]-node[01-02]`` (-> rack1-node01, rack1-node02, rack2-node01, ...).

    Raises:
        LaunchError: unbalanced brackets, a bad or decreasing range, an empty list.
    """
    hosts: list[str] = []
    for item in _hostlist_items(nodelist):
        pieces = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ..., text
        choices = [[text] if i % 2 == 0 else _expand_ranges(text, nodelist) for i, text in enumerate(pieces)]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    if not hosts:
        raise LaunchError(f"the Slurm node list {nodelist!r} names no host")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[01-04,07]`` -> ``node01``), parsed here, so no
    rank starts a process (``scontrol show hostnames``) to learn it."""
    return expand_hostlist(nodelist)[0]


def reachable_address(host: str) -> str:
    """``host`` if it resolves, else its Slurm ``NodeAddr`` (``scontrol show node``): node names
    need not be network names (``NodeName=n1 NodeAddr=10.1.0.7``, or several slurmd daemons on
    one machine). When neither works ``host`` is returned as it is, and the rendezvous names it.
    """
    try:
        socket.getaddrinfo(host, None)
        return host
    except (OSError, UnicodeError):
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", host], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else host


def _from_env_vars(env: Mapping[str, str], launcher: str) -> RankEnv:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = int(env.get("LOCAL_RANK", rank))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise LaunchError(
            f"{launcher}: RANK={rank} WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set"
        )
    if _in_srun_step(env) and launcher == "env":
        procid, ntasks = env["SLURM_PROCID"], env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
        if (str(rank), str(world)) != (procid, ntasks):
            raise LaunchError(
                f"RANK={rank} WORLD_SIZE={world} contradict srun's SLURM_PROCID={procid} "
                f"SLURM_STEP_NUM_TASKS={ntasks}: do not export RANK/WORLD_SIZE in a batch script "
                "that starts the ranks with srun (megalm reads them from srun)"
            )
    return RankEnv(
        launcher,
        rank,
        world,
        local,
        local_world,
        env.get("MASTER_ADDR", "127.0.0.1"),
        int(env.get("MASTER_PORT", 0)) or free_port(),
        f"{launcher}: WORLD_SIZE={world}",
    )


def _from_srun(env: Mapping[str, str]) -> RankEnv:
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int(env, world_var)
    node_id = int(env.get("SLURM_NODEID", 0))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(world)))
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", ""))
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif nodelist:
        addr = reachable_address(first_host(nodelist))
    else:
        raise LaunchError("srun: neither MASTER_ADDR nor SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is set")
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 10000 + _int(env, "SLURM_JOB_ID") % 50000
    return RankEnv(
        "srun",
        _int(env, "SLURM_PROCID"),
        world,
        _int(env, "SLURM_LOCALID"),
        tasks_on_node(per_node, node_id),
        addr,
        port,
        f"srun: {world_var}={world}",
    )


def _from_mpi(env: Mapping[str, str]) -> RankEnv:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            "started by mpirun but mpi4py is not installed: pip install 'megalm[mpi]' "
            "(and an MPI, e.g. pip install mpich)"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    env_rank = next((env[k] for k in MPI_RANK_VARS if k in env), str(rank))
    if env_rank != str(rank):
        raise LaunchError(f"MPI says rank {rank} but the environment says {env_rank}")
    master = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or (socket.gethostname() if world > 1 else "127.0.0.1")
        master = (addr, int(env.get("MASTER_PORT", 0)) or free_port())
    addr, port = comm.bcast(master, root=0)
    size_vars = " ".join(
        f"{k}={env[k]}"
        for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
        if k in env
    )
    world_from = f"mpirun: MPI_COMM_WORLD size {world}" + (f" ({size_vars})" if size_vars else "")
    return RankEnv("mpirun", rank, world, local.Get_rank(), local.Get_size(), addr, port, world_from)


def discover_ranks(env: Mapping[str, str] = os.environ) -> RankEnv:
    """This process's rank, world and master for whichever launcher started it.

    Raises:
        LaunchError: the environment is incomplete or contradictory; the message
            names the variables.
    """
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "deepspeed", "env"):
        if "RANK" not in env:
            raise LaunchError(f"{launcher} markers are set but RANK is not: a partial launcher environment")
        info = _from_env_vars(env, launcher)
    elif launcher == "mpirun":
        info = _from_mpi(env)
    elif launcher == "srun":
        info = _from_srun(env)
    else:
        info = RankEnv(
            "python",
            0,
            1,
            0,
            1,
            "127.0.0.1",
            free_port(),
            "python: no launcher variables (RANK/WORLD_SIZE, SLURM_PROCID in an srun step, "
            "OMPI_COMM_WORLD_RANK/PMI_RANK) are set, so this is a world of one",
        )
    if not (0 <= info.rank < info.world_size and 0 <= info.local_rank < info.local_world_size):
        raise LaunchError(
            f"{launcher}: rank {info.rank} of world {info.world_size}, local rank {info.local_rank} of "
            f"{info.local_world_size} is impossible"
        )
    return info


def init_distributed(cfg: Config, ranks: RankEnv | None = None) -> DistInfo:
    """Start the default process group (gloo on CPU, NCCL on CUDA) for ``ranks``
    (:func:`discover_ranks` when not given: discover first, validate the layout against
    ``ranks.world_size``, then call this).

    ``dist.timeout_s`` bounds the rendezvous and every collective: a rank that dies
    or hangs makes the others raise within it instead of waiting forever. Also gives
    each local rank its share of the CPU threads when the launcher did not set
    ``OMP_NUM_THREADS``, so ranks on one machine do not oversubscribe it.
    """
    import deepspeed

    # DeepSpeed's ZeRO calls a torch collective that torch >= 2.10 flags on every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")
    ranks = ranks or discover_ranks()
    os.environ.update(ranks.as_env())
    print(ranks.describe(), flush=True)
    cuda = torch.cuda.is_available()
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
        device = torch.device("cuda", ranks.local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world_size))
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    if not torch_dist.is_initialized():
        if ranks.world_size == 1:
            # A world of one needs no rendezvous: an in-memory store, so no TCP port to race
            # other jobs for (MASTER_PORT is then only a label).
            store = torch_dist.HashStore()
            torch_dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        release_shm_names(torch_dist.get_rank())  # DeepSpeed never unlinks its /dev/shm buffers
    return DistInfo(
        torch_dist.get_rank(),
        torch_dist.get_world_size(),
        ranks.local_rank,
        ranks.local_world_size,
        device,
        backend,
        ranks.launcher,
    )
