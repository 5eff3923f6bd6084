"""Command lines that start N ranks of a megalm program under each supported launcher.

One owner for how megalm is launched on one machine: the benchmark sweep and the tests
build their commands here, so a launcher's flags are written once.

========== ============================================================================
launcher   command
========== ============================================================================
python     ``python PROGRAM`` (one process)
torchrun   ``torchrun --nproc_per_node N --master_port P PROGRAM``
deepspeed  ``deepspeed --num_gpus N --master_port P [--module] PROGRAM``
mpirun     ``mpiexec -n N python PROGRAM``
srun       ``srun --ntasks N --cpus-per-task=1 --kill-on-bad-exit=1 python PROGRAM``
========== ============================================================================

``PROGRAM`` is a script and its arguments, or ``-m module`` and its arguments.

:func:`job_env` is the environment such a command runs with. :func:`run_local_ranks`
starts N ranks of a *function* instead: CPU processes joined by a gloo group on this
machine (the tests' ``run_distributed``, the communication benchmarks).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

LAUNCHERS = ("python", "torchrun", "deepspeed", "mpirun", "srun")
# Set by a launcher for its own ranks; a job started from one of them must not inherit them.
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on this machine right now (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """``name`` from this interpreter's environment (the venv's bin), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def job_env(checkout: Path) -> dict[str, str]:
    """This process's environment for a megalm job it starts (a sweep configuration, a test run).

    ``checkout`` first on ``PYTHONPATH`` (its code is what runs) and this interpreter's
    ``bin`` first on ``PATH`` (its launchers); one OpenMP thread unless set; DeepSpeed's
    JIT-built CPU comm op cached per environment (``<sys.prefix>/torch_extensions``: a cache
    shared by several environments is rebuilt at every start, ~1 min) unless set; and
    none of :data:`RANK_VARS` (a sweep started under torchrun must not hand its rank on).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH", "")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for key in RANK_VARS:
        env.pop(key, None)
    return env


def launch_command(launcher: str, nproc: int, program: list[str], port: int | None = None) -> list[str]:
    """The command that starts ``nproc`` ranks of ``program`` under ``launcher``.

    Raises:
        ValueError: an unknown launcher, or ``python`` asked for more than one process.
    """
    port_arg = str(port or free_port())
    py = sys.executable
    if launcher == "python":
        if nproc != 1:
            raise ValueError(f"launcher python runs one process; this configuration needs {nproc}")
        return [py, *program]
    if launcher == "torchrun":
        return [_tool("torchrun"), "--nproc_per_node", str(nproc), "--master_port", port_arg, *program]
    if launcher == "deepspeed":
        module = ["--module", *program[1:]] if program[:1] == ["-m"] else program
        return [_tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", port_arg, *module]
    if launcher == "mpirun":
        return [_tool("mpiexec"), "-n", str(nproc), py, *program]
    if launcher == "srun":
        return ["srun", "--ntasks", str(nproc), "--cpus-per-task=1", "--kill-on-bad-exit=1", py, *program]
    raise ValueError(f"unknown launcher '{launcher}'; use one of {', '.join(LAUNCHERS)}")


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ranks(
    world_size: int, fn: Callable, *args: Any, timeout: float = 300.0, start_method: str = "fork"
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes in one gloo group.

    Each process runs one torch thread and the default process group (gloo, a free
    local port); ``fn`` builds its own subgroups. ``fn`` must be a module-level function
    (and, with ``start_method="spawn"``, it and ``args`` picklable).

    Args:
        timeout: seconds to wait for each rank's answer.

    Returns:
        ``fn``'s return values by rank.

    Raises:
        RuntimeError: a rank failed (its traceback is the message), or did not answer in time.
    """
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except Empty:  # a rank hung, or died without a word
                errors.append(f"{world_size - len(results)} rank(s) did not answer within {timeout:.0f}s")
                break
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
