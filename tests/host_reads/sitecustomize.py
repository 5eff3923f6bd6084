"""Count host reads of tensors made by megalm's code, per process, when ``MEGALM_HOST_READS`` names
a directory (tests/host_reads.py puts this directory first on ``PYTHONPATH`` of a launched run).

A host read is a call that needs a tensor's value on the host: ``item``, ``tolist``, ``cpu``,
``numpy``, ``float()``/``int()``/``bool()``/``format()`` of a tensor. On a GPU each one waits for
the device's queue to drain. Only calls whose direct caller is a file under ``megalm/`` count (DeepSpeed's
and torch's own reads are not megalm's to remove); each is filed under the first megalm
function on the stack that marks a phase of the training loop:

- ``step``: inside ``Trainer._train_step`` (the forward, backward, health check and optimizer);
- ``log``: inside ``Progress.maybe_log`` or ``Trainer._gather_rank_work`` (a log step's reads);
- ``other``: start-up, evaluation, checkpoints, the sample.

At exit each process that counted anything writes ``<dir>/<pid>.json``:
``{"rank": RANK, "counts": {phase: n}, "sites": {"phase file:line": n}}``.
"""

from __future__ import annotations

import atexit
import collections
import importlib.abc
import importlib.util
import json
import os
import sys

OUT = os.environ.get("MEGALM_HOST_READS")
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__format__")
PHASES = {"_train_step": "step", "maybe_log": "log", "_gather_rank_work": "log"}
SEP = os.sep + "megalm" + os.sep
sites: collections.Counter = collections.Counter()


def _phase(frame) -> str:
    while frame is not None:
        code = frame.f_code
        if code.co_name in PHASES and SEP in code.co_filename:
            return PHASES[code.co_name]
        frame = frame.f_back
    return "other"


def _wrap(cls, name: str) -> None:
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        caller = sys._getframe(1)
        if SEP in caller.f_code.co_filename:
            where = caller.f_code.co_filename.split(SEP, 1)[1]
            sites[f"{_phase(caller)} megalm/{where}:{caller.f_lineno} {name}"] += 1
        return original(self, *args, **kwargs)

    setattr(cls, name, counted)


def _patch(torch) -> None:
    for name in READS:
        _wrap(torch.Tensor, name)


def _write() -> None:
    if not sites:
        return
    counts: collections.Counter = collections.Counter()
    for site, n in sites.items():
        counts[site.split(" ", 1)[0]] += n
    record = {"rank": os.environ.get("RANK"), "counts": dict(counts), "sites": dict(sites)}
    with open(os.path.join(OUT, f"{os.getpid()}.json"), "w") as f:
        json.dump(record, f, indent=1)


class _PatchTorchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``torch.Tensor`` right after ``import torch`` runs (no torch import at start-up)."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_then_patch(module) -> None:
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if OUT:
    sys.meta_path.insert(0, _PatchTorchOnImport())
    atexit.register(_write)
