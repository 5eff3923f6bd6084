"""Read documents from text inputs: ``.txt`` (one file = one document) and ``.jsonl``.

Paths may be files, directories (searched recursively) or globs; the expanded
list is sorted so every run reads documents in the same order.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class InputError(ValueError):
    """An input path or record that cannot be read as documents."""


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files named by ``paths`` (files, directories, globs), sorted; raises if none."""
    files: set[Path] = set()
    for raw in paths:
        matches = [Path(m) for m in glob.glob(raw, recursive=True)] or [Path(raw)]
        for m in matches:
            if m.is_dir():
                files.update(f for f in m.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            elif m.is_file():
                if not m.name.endswith(SUFFIXES):
                    raise InputError(f"input '{m}' has an unsupported type; expected one of {SUFFIXES}")
                files.add(m)
            else:
                raise InputError(f"input '{raw}' does not exist; check the --input path")
    if not files:
        raise InputError(f"no input files ({', '.join(SUFFIXES)}) found in {paths}")
    return sorted(files)


def read_documents(files: list[Path], text_key: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of ``files`` in order."""
    for path in files:
        if path.name.endswith(".txt"):
            text = path.read_bytes().decode("utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                if text_key not in record:
                    raise InputError(f"{path}:{lineno}: no '{text_key}' field; pass --text-key")
                text = record[text_key]
                if isinstance(text, str) and text.strip():
                    yield text
