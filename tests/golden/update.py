"""Regenerate ``tests/golden/<family>.json`` and print the diff (``make golden``, ``pytest --update-golden``).

The golden run is one process, ``python launch/pretrain.py`` with
:func:`tests.golden.golden_run_overrides` on the data of :func:`tests.golden.build_golden_data`:
the only place in the suite where a single-process run is made to be compared with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from tests.golden import FAMILIES, build_golden_data, golden_path, golden_record, golden_run_overrides


def run_golden(run_dir: Path, data_dir: Path, family: str) -> Path:
    """The single-process golden run of ``family`` in ``run_dir`` (fails loudly); its host
    reads are counted beside it (:func:`tests.host_reads.reads_dir`)."""
    from tests.host_reads import host_read_env, reads_dir
    from tests.launching import cpu_env, run_pretrain

    env = host_read_env(reads_dir(run_dir), cpu_env())
    proc = run_pretrain(golden_run_overrides(run_dir, data_dir, family), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"golden {family} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run_dir


def _rel(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{abs(a - b) / abs(b):.1e}" if b else f"{abs(a - b):.1e}"


def diff_text(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A readable diff of two golden records: header changes, then one line per changed number."""
    family = new["family"]
    if old is None:
        return f"{family}: new golden curve ({len(new['steps'])} steps)"
    lines = []
    for section in ("made_with", "data", "config"):
        for key in sorted(set(old[section]) | set(new[section])):
            a, b = old[section].get(key), new[section].get(key)
            if a != b:
                lines.append(f"  {section}.{key}: {a!r} -> {b!r}")
    old_steps = {r["step"]: r for r in old["steps"]}
    for r in new["steps"]:
        o = old_steps.get(r["step"], {})
        for key in ("loss", "grad_norm", "lr"):
            if o.get(key) != r[key]:
                change = f"{o.get(key)!r} -> {r[key]!r} (rel {_rel(r[key], o.get(key))})"
                lines.append(f"  step {r['step']:>2} {key:<9} {change}")
    for step, v in new["val_loss"].items():
        o = old["val_loss"].get(step)
        if o != v:
            lines.append(f"  step {step:>2} val_loss  {o!r} -> {v!r} (rel {_rel(v, o)})")
    if not lines:
        return f"{family}: unchanged"
    return f"{family}: {len(lines)} changes\n" + "\n".join(lines)


def write_golden(run_dir: Path, family: str) -> str:
    """Write ``family``'s golden file from a finished golden run; return the diff against the old one."""
    path = golden_path(family)
    old = json.loads(path.read_text()) if path.is_file() else None
    new = golden_record(run_dir, family)
    path.write_text(json.dumps(new, indent=1) + "\n")
    return diff_text(old, new)


def regenerate(data_dir: Path, work_dir: Path, families: tuple[str, ...] = FAMILIES) -> dict[str, Path]:
    """Run every family's golden run under ``work_dir``, write the files, print the diffs."""
    runs = {}
    for family in families:
        runs[family] = run_golden(work_dir / family, data_dir, family)
        print(write_golden(runs[family], family), flush=True)
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=FAMILIES, action="append", help="default: every family")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megalm-golden-") as tmp:
        data_dir = build_golden_data(Path(tmp) / "data")
        regenerate(data_dir, Path(tmp) / "runs", tuple(args.family or FAMILIES))


if __name__ == "__main__":
    main()
