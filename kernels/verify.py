"""Self-verifying kernels: each Triton kernel proves itself on the device before ``auto`` uses it.

The first time ``impl="auto"`` would send an op to Triton on a device and dtype,
:func:`passed` runs the op's check (:data:`kernels.checks.CHECKS`: Triton path
against the PyTorch reference, forward and backward, small shapes, on that
device, in that dtype) and caches the verdict

* in the process (each (op, device, dtype) is decided once), and
* on disk, one JSON file per (op, device name, triton version, kernel source
  hash, dtype) under :func:`cache_dir`, so later runs on the same GPU model and
  code skip the check. Editing a kernel changes its source hash and re-runs it.

A failing kernel (wrong numbers, or any error while compiling or launching)
makes ``auto`` take the PyTorch path for that op, with one warning line naming
the kernel, the device and the error (logger ``kernels.verify``; once per
process). ``impl="triton"`` never consults the self-test.

Cache directory: ``$MEGALM_KERNEL_CACHE`` if set, else
``$XDG_CACHE_HOME/megalm/kernels``, else ``~/.cache/megalm/kernels``. An
unwritable cache only loses the on-disk copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import torch

CACHE_ENV = "MEGALM_KERNEL_CACHE"
CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Files whose text decides each kernel's behaviour (kernel, launcher, op, launch mechanism)
# or its verdict (the check and the tolerance rule).
SOURCES = {
    op: [f"kernels.{op}.{part}" for part in ("kernel", "function", "ops")]
    + ["kernels.interpreter", "kernels.checks", "kernels.tolerance"]
    for op in ("attention", "softmax", "norms", "cross_entropy")
}

log = logging.getLogger("kernels.verify")
_verdicts: dict[tuple[str, str, str], bool] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    """Where verdicts are stored (see the module docstring for the lookup order)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megalm" / "kernels"


def device_name(device: str) -> str:
    """The device model a verdict holds for: the GPU's name and capability, or the interpreter."""
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{torch.cuda.get_device_name(dev)} (sm_{major}{minor})"
    return f"{dev.type} (triton interpreter)"


def source_hash(op: str) -> str:
    """sha256 over the source files of ``op``'s Triton path and of the checks."""
    digest = hashlib.sha256()
    for module in SOURCES[op]:
        digest.update(Path(find_spec(module).origin).read_bytes())
    return digest.hexdigest()


def cache_key(op: str, device: str, dtype: torch.dtype) -> dict[str, str]:
    """What a verdict depends on."""
    import triton

    return {
        "op": op,
        "device": device_name(device),
        "triton": triton.__version__,
        "source_sha256": source_hash(op),
        "dtype": str(dtype).removeprefix("torch."),
    }


def cache_path(key: dict[str, str]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{key['op']}-{key['dtype']}-{name}.json"


def passed(op: str, device: str, dtype: torch.dtype | None) -> bool:
    """Whether ``op``'s Triton kernel may run on ``device`` in ``dtype`` (self-tested once).

    Dtypes the kernels do not take (fp64, integers, None) are never tested: False.
    """
    if dtype not in CHECKED_DTYPES:
        return False
    memo = (op, str(torch.device(device)), str(dtype))
    if memo in _verdicts:
        return _verdicts[memo]
    with _lock:
        if memo not in _verdicts:
            record = _cached_or_checked(op, device, dtype)
            if not record["passed"]:
                log.warning(
                    "warning: kernel %s failed its self-test on %s (%s): %s; using the PyTorch path",
                    op, record["device"], record["dtype"], record["error"],
                )  # fmt: skip
            _verdicts[memo] = bool(record["passed"])
    return _verdicts[memo]


def _cached_or_checked(op: str, device: str, dtype: torch.dtype) -> dict:
    key = cache_key(op, device, dtype)
    path = cache_path(key)
    try:
        record = json.loads(path.read_text())
        if {k: record.get(k) for k in key} == key and isinstance(record.get("passed"), bool):
            return record
    except (OSError, ValueError):
        pass  # no verdict yet (or an unreadable one): run the check
    record = {
        **key,
        **run_check(op, device, dtype),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        log.info("kernel self-test verdict not cached (%s)", err)
    return record


def run_check(op: str, device: str, dtype: torch.dtype) -> dict:
    """Run ``op``'s check now; returns ``{"passed": bool, "error": str | None, "seconds": float}``."""
    from kernels.checks import CHECKS

    start = time.perf_counter()
    no_autocast = torch.autocast(torch.device(device).type, enabled=False)  # the run may be inside one
    try:
        with torch.inference_mode(False), torch.enable_grad(), no_autocast:
            CHECKS[op](device, dtype)
    except Exception as err:  # a wrong result or a failed compile/launch: both mean "do not use"
        message = " ".join(f"{type(err).__name__}: {err}".split())
        return {"passed": False, "error": message[:500], "seconds": time.perf_counter() - start}
    return {"passed": True, "error": None, "seconds": time.perf_counter() - start}


def forget() -> None:
    """Drop the in-process verdicts (the disk cache stays); for tests."""
    with _lock:
        _verdicts.clear()
