"""What every command-line entry shares: the ``error:`` line of bad input and the benchmark report.

- :func:`bad_input`: bad input (a config, data or missing file problem) is one ``error:``
  line on stderr and exit code 2, in every script and tool.
- :func:`run`: the entry of the checkpoint scripts (``launch/evaluate.py``,
  ``launch/generate.py``): calls a module's ``main()``, bad input as above.
- :func:`add_config_args`: ``--config X.yaml [section.key=value ...]``, how every script
  that reads a config takes it (STYLE.md: YAML + typed dataclasses + overrides).
- :func:`bench_parser`, :func:`write_report`: a benchmark script prints a table and writes
  ``<--out>/<name>.json`` (default folder ``runs/bench``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

BENCH_OUT = Path("runs/bench")


def bad_input(err: Exception | str) -> int:
    """Print ``err`` as the one ``error: ...`` line on stderr; returns the exit code of bad input, 2."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def run(module: str) -> None:
    """Exit with ``module.main()``'s code; bad input is one ``error:`` line and exit 2."""
    from megalm.config import ConfigError
    from megalm.data import DataError

    try:
        sys.exit(importlib.import_module(module).main())
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.exit(bad_input(e))


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--config`` (required unless ``default``) and the ``section.key=value`` overrides."""
    help_ = "YAML config, e.g. configs/tiny.yaml" + (f" (default {default})" if default else "")
    p.add_argument("--config", required=default is None, default=default, help=help_)
    p.add_argument("overrides", nargs="*", help="section.key=value")


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark script's parser: described by ``doc``'s first line, with ``--out`` (a folder)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=BENCH_OUT, help=f"report folder (default {BENCH_OUT})")
    return p


def write_report(out: Path, name: str, record: Any) -> Path:
    """Write ``record`` as indented JSON to ``out/name`` (making ``out``); prints and returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path
