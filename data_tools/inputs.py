"""Read raw documents: ``.txt`` (one file = one document), ``.jsonl[.gz|.zst]`` and ``.parquet``.

Paths may be files, directories (searched recursively) or globs; the expanded
list is sorted so every run reads documents in the same order.

Reading is split in two so the expensive half runs in worker processes:
:func:`read_records` (main process) yields :class:`Record` s holding raw bytes
and where they came from; :func:`decode_record` (worker) turns one into text,
applying the bad-input policy to invalid JSON, a missing text field, non-UTF-8
bytes and empty documents.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


class InputError(ValueError):
    """An input path or record that cannot be read as documents."""


@dataclass(frozen=True)
class Record:
    """One raw document: ``kind`` is ``txt`` (bytes), ``json`` (a JSON line) or ``text`` (a str)."""

    kind: str
    payload: bytes | str
    where: str  # "file" or "file:line" / "file:row", for messages
    done_bytes: int  # input bytes consumed so far (all files), for progress and ETA


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


def _open_lines(path: Path, raw: io.BufferedReader) -> io.BufferedReader:
    if path.name.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw))
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def read_records(files: list[Path], text_key: str = "text") -> Iterator[Record]:
    """Yield the raw documents of ``files`` in order (no decoding or validation yet)."""
    before = 0
    for path in files:
        size = path.stat().st_size
        if path.name.endswith(".txt"):
            yield Record("txt", path.read_bytes(), str(path), before + size)
        elif path.name.endswith(".parquet"):
            yield from _parquet_records(path, text_key, before, size)
        else:
            with open(path, "rb") as raw, _open_lines(path, raw) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield Record("json", line, f"{path}:{lineno}", before + raw.tell())
        before += size


def _parquet_records(path: Path, text_key: str, before: int, size: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise InputError(
            f"{path}: no '{text_key}' column (columns: {pf.schema_arrow.names}); pass --text-key"
        )
    total, row = max(1, pf.metadata.num_rows), 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            payload = value if isinstance(value, str | bytes) else "" if value is None else None
            if payload is None:
                raise InputError(f"{where}: '{text_key}' is {type(value).__name__}, not text")
            yield Record(
                "txt" if isinstance(payload, bytes) else "text", payload, where, before + size * row // total
            )


class _Bad(Exception):
    """A record that is not a document: ``reason`` is the skip counter, the message a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _text_of(rec: Record, text_key: str) -> str:
    """The text of ``rec``; raises :class:`_Bad` for a record that has none."""
    try:
        if rec.kind == "text":
            return rec.payload
        if rec.kind == "txt":
            return rec.payload.decode("utf-8")
        record = json.loads(rec.payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _Bad(
            "non_utf8",
            f"{rec.where}: not UTF-8 (byte {e.start}: {e.reason}); fix the file or pass --on-bad-input skip",
        ) from None
    except json.JSONDecodeError as e:
        raise _Bad("bad_json", f"{rec.where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_key not in record:
        raise _Bad("missing_key", f"{rec.where}: no '{text_key}' field; pass --text-key")
    text = record[text_key]
    if not isinstance(text, str):
        raise _Bad("not_text", f"{rec.where}: '{text_key}' is {type(text).__name__}, not text")
    return text


def decode_record(rec: Record, text_key: str, on_bad_input: str) -> tuple[str | None, str]:
    """The document text of ``rec``, or ``(None, reason)`` for a counted skip.

    Empty documents are always skipped (they hold no tokens). Under ``raise`` every
    other problem is an :class:`InputError` naming the file and line.
    """
    try:
        text = _text_of(rec, text_key)
    except _Bad as e:
        if on_bad_input == "raise":
            raise InputError(str(e)) from None
        return None, e.reason
    if not text.strip():
        return None, "empty"
    return text, ""


def read_documents(files: list[Path], text_key: str = "text", on_bad_input: str = "raise") -> Iterator[str]:
    """Yield the non-empty documents of ``files`` in order (single process; the tokenizer trainer)."""
    for rec in read_records(files, text_key):
        text, _ = decode_record(rec, text_key, on_bad_input)
        if text is not None:
            yield text
