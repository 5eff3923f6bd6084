"""Build DeepSpeed's CPU communication op once, before any run needs it.

DeepSpeed's ``TorchBackend`` JIT-compiles its shared-memory all-reduce op
(``deepspeed_shm_comm``) the first time any rank initializes on the CPU accelerator,
under ``TORCH_EXTENSIONS_DIR``. torch guards that build with a lock file and every
other process waits for the file to disappear, with no timeout: a build killed half-way
(a test timeout, a Ctrl-C, a preempted job) leaves the lock behind and every later run
on the machine hangs in ``FileBaton.wait``. ``make install`` runs this module once, so
runs start with the op built; a lock older than ``STALE_LOCK_S`` whose build produced
nothing since is removed first, with a note.

The same op, once initialized (every rank of a one-node job started by the ``deepspeed``
launcher, which sets ``LOCAL_SIZE``), creates a 66 MB shared-memory buffer per rank under
``/dev/shm`` and never unlinks it: every such job left its buffers behind until the
machine's memory (``/dev/shm`` is RAM) ran out. :func:`release_shm_names` unlinks this
rank's buffer name once every rank has mapped its peers' buffers; the mappings stay valid
and the memory is freed when the job's last process exits.

Usage: ``python -c "from megalm.train.ds_ops import build_comm_op; print(build_comm_op())"``
(what ``make install`` runs; ``-m`` would import the module twice through ``megalm.train``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STALE_LOCK_S = 1800  # no single-op build takes 30 minutes, even on 2 loaded cores
OP_DIR = "deepspeed_shm_comm"


def extensions_dir() -> Path:
    """Where torch keeps JIT-built extensions (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    from torch.utils.cpp_extension import _get_build_directory

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(_get_build_directory(OP_DIR, verbose=False)).parent


def remove_stale_lock(op_dir: Path, now: float | None = None) -> bool:
    """Delete ``op_dir/lock`` when it and every build output are older than :data:`STALE_LOCK_S`
    (a build that died); returns whether it did."""
    lock = op_dir / "lock"
    if not lock.exists():
        return False
    now = time.time() if now is None else now
    newest = max(p.stat().st_mtime for p in op_dir.iterdir())
    if now - newest < STALE_LOCK_S:
        return False  # a build may still be running
    lock.unlink(missing_ok=True)
    return True


def shm_buffer(rank: int) -> Path:
    """The ``/dev/shm`` file of ``rank``'s all-reduce buffer (``SHM_BUFFER_NAME`` in DeepSpeed's
    ``csrc/cpu/comm/shm.cpp``: ``<name>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names(rank: int) -> None:
    """Collective when there is a buffer (after ``deepspeed.init_distributed``): unlink this
    rank's shm buffer name.

    DeepSpeed creates the buffers on every rank or on none (all ranks of one node under a
    launcher that sets ``LOCAL_SIZE``), and each rank's own before ``init_distributed``
    returns, so a rank without one skips the barrier together with all others. The barrier
    makes sure every rank has opened every peer's buffer (DeepSpeed's ``shm_initialize`` maps
    them all before it returns) before any name goes.
    """
    import torch.distributed as dist

    path = shm_buffer(rank)
    if not path.exists():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    path.unlink(missing_ok=True)


def build_comm_op() -> str:
    """Build (or find built) DeepSpeed's CPU shm communication op; a one-line report."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    op_dir = extensions_dir() / OP_DIR
    note = ""
    if op_dir.is_dir() and remove_stale_lock(op_dir):
        note = f" (removed a stale build lock in {op_dir}, left by a build that was killed)"
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    if op is None:
        return f"DeepSpeed's shm comm op is not used on this accelerator{note}"
    return f"DeepSpeed's shm comm op is built in {op_dir}{note}"
