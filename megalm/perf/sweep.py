"""A throughput sweep: one launcher job per configuration, results as CSV, JSON and plots.

Each configuration is a separate job of :mod:`megalm.perf.worker` started by a launcher
(``python`` for one process; ``torchrun``, the DeepSpeed launcher or ``srun`` for several), so
every configuration gets fresh processes and its own process group, and a crash or
out-of-memory kills only that job. The number of processes is ``tp * cp * pp * dp``
(``dp`` from ``--dp``) unless ``--nproc`` fixes it. A configuration that fails
(the trainer's layout checks, an exception, OOM, a timeout) is recorded with its
error message and the sweep goes on.
"""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megalm.config import ConfigError
from megalm.train.launchers import job_env
from megalm.train.launchers import launch_command as launch_command_for

ROOT = Path(__file__).resolve().parents[2]

COLUMNS = [
    "status",
    "world_size",
    "tokens_per_s_per_device",
    "tflops_per_device",
    "mfu",
    "hfu",
    "mfu_causal",
    "peak_mem_gb",
    "model_state_bytes",
    "activation_bytes_per_micro_batch",
    "step_s",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "comm_s",
    "error",
]


def parse_sweep(items: list[str], zipped: bool = False) -> list[dict[str, str]]:
    """``["a.b=1,2", "c.d=x,y"]`` -> the cartesian product as override dicts (first key slowest),
    or with ``zipped`` the i-th value of every key together (all lists of one length).

    Raises:
        ConfigError: an item without ``=``, an empty value list, or zipped lists of unequal length.
    """
    keys, values = [], []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sweep item '{item}' is not of the form key.sub=v1,v2")
        key, raw = item.split("=", 1)
        vals = [v.strip() for v in raw.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--sweep item '{item}' has no values")
        keys.append(key.strip())
        values.append(vals)
    if zipped:
        if len({len(v) for v in values}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in zip(keys, values, strict=True))
            raise ConfigError(f"--zip needs the same number of values for every --sweep key ({lengths})")
        return [dict(zip(keys, combo, strict=True)) for combo in zip(*values, strict=True)]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _int(overrides: dict[str, str], key: str, default: int) -> int:
    try:
        return int(overrides.get(key, default))
    except ValueError:
        return default


@dataclass
class SweepSettings:
    """How every configuration of a sweep is launched and timed."""

    config: str
    out: Path
    launcher: str = "auto"  # auto (python for one process, else torchrun) or one of launchers.LAUNCHERS
    dp: int = 1
    nproc: int = 0  # 0: tp * cp * pp * dp
    steps: int = 5
    warmup: int = 2
    timeout_s: float = 1800.0


def launch_command(s: SweepSettings, overrides: list[str], nproc: int, out: Path) -> list[str]:
    """The command line that runs one configuration on ``nproc`` processes
    (:func:`megalm.train.launchers.launch_command`, the one owner of launcher flags)."""
    worker = ["--config", s.config, "--out", str(out), "--steps", str(s.steps), "--warmup", str(s.warmup)]
    launcher = s.launcher
    if launcher == "auto":
        launcher = "python" if nproc == 1 else "torchrun"
    try:
        return launch_command_for(launcher, nproc, ["-m", "megalm.perf.worker", *worker, *overrides])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _tail_error(text: str) -> str:
    """The last ``error:``/exception line of a failed job's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("error:", "Error", "RuntimeError", "ValueError")) or "Error:" in ln:
            return ln[:500]
    return lines[-1][:500] if lines else "no output"


def processes(s: SweepSettings, sweep: dict[str, str]) -> int:
    """Processes one configuration runs on: ``--nproc``, else ``tp * cp * pp * dp``."""
    tp, pp, cp = (_int(sweep, f"parallel.{k}", 1) for k in ("tp", "pp", "cp"))
    return s.nproc or tp * pp * cp * s.dp


def run_one(s: SweepSettings, index: int, sweep: dict[str, str], fixed: list[str]) -> dict[str, Any]:
    """Launch one configuration and return its result row (``status`` ok/failed/oom/timeout)."""
    out = s.out / f"config_{index:03d}"
    overrides = [*fixed, *(f"{k}={v}" for k, v in sweep.items()), f"run.dir={out / 'run'}"]
    nproc = processes(s, sweep)
    row: dict[str, Any] = {"index": index, **sweep, "nproc": nproc}
    try:
        cmd = launch_command(s, overrides, nproc, out)
    except ConfigError as e:
        return {**row, "status": "failed", "error": str(e)}
    row["command"] = " ".join(cmd)
    (out / "result.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env=job_env(ROOT), timeout=s.timeout_s
        )
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "error": f"no result after {s.timeout_s:.0f}s"}
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    result_file = out / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        result.pop("config", None)
        result.pop("traceback", None)
        return {**row, **result}
    return {
        **row,
        "status": "failed",
        "error": f"exit {proc.returncode}: {_tail_error(proc.stdout + proc.stderr)}",
    }


def write_outputs(rows: list[dict[str, Any]], keys: list[str], out: Path) -> list[Path]:
    """``results.csv`` (one row per configuration), ``results.json`` and PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "results.csv", out / "results.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", *keys, "nproc", *COLUMNS], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return [csv_path, json_path, *plot(rows, keys, out)]


def _label(row: dict[str, Any], keys: list[str]) -> str:
    return "\n".join(f"{k.split('.')[-1]}={row.get(k)}" for k in keys) or str(row["index"])


def plot(rows: list[dict[str, Any]], keys: list[str], out: Path) -> list[Path]:
    """``throughput.png`` (tokens/s/device and MFU) and ``step_time.png`` (stacked parts).

    Failed configurations appear as empty slots marked with their status.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(r, keys) for r in rows]
    ok = [r.get("status") == "ok" for r in rows]
    x = list(range(len(rows)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) * 2), 4.5))
    a1.bar(x, [r.get("tokens_per_s_per_device", 0) if k else 0 for r, k in zip(rows, ok, strict=True)])
    a1.set_ylabel("tokens/s per device")
    a2.bar(x, [100 * r.get("mfu", 0) if k else 0 for r, k in zip(rows, ok, strict=True)], color="tab:orange")
    a2.set_ylabel("MFU (%), 6N+12LTd, non-causal")
    for ax in (a1, a2):
        ax.set_xticks(x, labels, fontsize=7)
        for i, good in enumerate(ok):
            if not good:
                ax.text(i, 0, rows[i].get("status", "?"), ha="center", va="bottom", color="red", rotation=90)
    fig.tight_layout()
    p1 = out / "throughput.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for part in ("forward_s", "backward_s", "optimizer_s"):
        vals = [1e3 * r.get(part, 0) if k else 0 for r, k in zip(rows, ok, strict=True)]
        ax.bar(x, vals, bottom=bottom, label=part.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    comm = [1e3 * r.get("comm_s", 0) if k else 0 for r, k in zip(rows, ok, strict=True)]
    ax.scatter(x, comm, color="black", marker="_", s=400, label="communication (overlaps)", zorder=3)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("ms per optimizer step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "step_time.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def format_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """A fixed-width table of the sweep (failed rows show their error)."""
    head = " ".join(f"{k.split('.')[-1]:>11}" for k in keys)
    lines = [
        f"{head} {'nproc':>5} {'status':>7} {'tok/s/dev':>10} {'TFLOP/s':>9} {'MFU':>6} {'HFU':>6} "
        f"{'mem GB':>7} {'step ms':>8} {'fwd':>7} {'bwd':>7} {'opt':>6} {'comm':>6}"
    ]
    for r in rows:
        vals = " ".join(f"{r.get(k)!s:>11}" for k in keys)
        if r.get("status") != "ok":
            lines.append(f"{vals} {r.get('nproc')!s:>5} {r.get('status')!s:>7}  {r.get('error', '')}")
            continue
        lines.append(
            f"{vals} {r['nproc']:>5} {'ok':>7} {r['tokens_per_s_per_device']:>10,.0f} "
            f"{r['tflops_per_device']:>9.4f} {r['mfu']:>6.1%} {r['hfu']:>6.1%} {r['peak_mem_gb']:>7.2f} "
            f"{1e3 * r['step_s']:>8.1f} {1e3 * r['forward_s']:>7.1f} {1e3 * r['backward_s']:>7.1f} "
            f"{1e3 * r['optimizer_s']:>6.1f} {1e3 * r['comm_s']:>6.1f}"
        )
    return "\n".join(lines)


def run_sweep(
    s: SweepSettings,
    sweep_items: list[str],
    fixed: list[str],
    log: Callable[[str], None] = print,
    zipped: bool = False,
) -> list[dict[str, Any]]:
    """Run every configuration of ``sweep_items`` (product, or zipped) plus ``fixed`` overrides."""
    combos = parse_sweep(sweep_items, zipped) if sweep_items else [{}]
    rows = []
    for i, combo in enumerate(combos):
        desc = " ".join(f"{k}={v}" for k, v in combo.items()) or "(base config)"
        log(f"[{i + 1}/{len(combos)}] {desc}")
        row = run_one(s, i, combo, fixed)
        msg = (
            f"{row['tokens_per_s_per_device']:,.0f} tok/s/device, MFU {row['mfu']:.1%}"
            if row.get("status") == "ok"
            else row.get("error", "")
        )
        log(f"    {row['status']}: {msg}")
        rows.append(row)
    return rows
