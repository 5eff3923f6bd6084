"""Build the embedded default corpus: the running interpreter's standard library source.

Every machine with Python has it, so ``make train`` works offline. Test suites
(``test/``, ``tests/``, ``idle_test/``) and ``site-packages`` are left out; files
are read in sorted path order, so the corpus is the same on every run.

Usage: ``python -m data_tools.stdlib_corpus --output data/stdlib/raw [--max-mb 16]``
writes ``stdlib.jsonl`` with one ``{"path", "text"}`` object per source file.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, without tests or third-party code."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(output: Path, max_mb: float = 16.0, root: Path | None = None) -> tuple[Path, int, int]:
    """Write ``output/stdlib.jsonl``; returns (path, documents, bytes)."""
    output.mkdir(parents=True, exist_ok=True)
    out = output / "stdlib.jsonl"
    root = Path(root or sysconfig.get_paths()["stdlib"])
    budget, docs, total = int(max_mb * 2**20), 0, 0
    with open(out, "w", encoding="utf-8") as f:
        for path in stdlib_files(root):
            text = path.read_bytes().decode("utf-8", errors="replace")
            if not text.strip():
                continue
            if total + len(text) > budget:
                break
            f.write(json.dumps({"path": path.relative_to(root).as_posix(), "text": text}) + "\n")
            docs, total = docs + 1, total + len(text)
    if docs == 0:
        raise SystemExit(f"error: no Python source found under {root}; pass --root to a stdlib directory")
    return out, docs, total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help="directory for stdlib.jsonl")
    p.add_argument("--max-mb", type=float, default=16.0, help="stop after this many MB of text")
    p.add_argument("--root", type=Path, default=None, help="stdlib directory (default: this interpreter's)")
    args = p.parse_args(argv)
    out, docs, total = build_corpus(args.output, args.max_mb, args.root)
    print(f"wrote {out}: {docs} documents, {total / 2**20:.1f} MB (from Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
