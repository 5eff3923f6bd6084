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
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

LAUNCHERS = ("python", "torchrun", "deepspeed", "mpirun", "srun")


def free_port() -> int:
    """A TCP port free on this machine right now (for ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """``name`` from this interpreter's environment (the venv's bin), else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


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
