"""Tokenize documents in parallel into webdataset ``.tar`` shards plus ``manifest.json``.

One sample per document: ``<key>.ids.npy`` holds its token ids (uint16 when the
vocabulary fits, else uint32; no EOS: the loader inserts it between documents);
the key ``<split>-<shard>-<document>`` (``train-00003-000000017``) is unique across
the shards and splits of a data set. Each shard gets a sidecar
``<shard>.index.npy`` (byte offset and length of every document's tokens) so the
loader memory-maps shards without scanning them; the manifest lists each shard's
sha256, size and its sidecar's sha256 (what a remote reader verifies). A
document goes to the validation split when a hash of its text falls under
``--val-fraction``, so the split does not depend on input order or worker count.
Same inputs and settings give byte-identical shards (fixed tar metadata, results
consumed in input order).

The output is written beside ``--output`` and published by a rename when complete
(:mod:`data_tools.publish`): a failed or killed run changes nothing, and an
existing data set is replaced only with ``--overwrite``.

The pipeline, stage by stage (:func:`preprocess`)::

    read_records           main     raw bytes + file:line, in input order
    _batched               main     lists of ``batch_docs`` records
    bounded_imap(_encode)  workers  decode/validate, tokenize, val split, npy-encode
                                    (at most 4 x workers batches in flight)
    _write                 main     tar members, progress (docs/s, tokens/s, ETA)

Usage::

    python -m data_tools.preprocess --input PATH... --tokenizer T --output DIR \\
        [--text-key text] [--workers N] [--shard-tokens N] [--val-fraction F] \\
        [--on-bad-input raise|skip] [--overwrite]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.inputs import InputError, Record, decode_record, expand_inputs, read_records
from data_tools.publish import check_output, staged_output
from data_tools.train_tokenizer import EOS, PAD, load_tokenizer
from megalm.cli import bad_input
from megalm.data.pool import bounded_imap
from megalm.data.shards import SUFFIX, sha256_file

MANIFEST_VERSION = 3  # 3: document keys unique per data set; shard bytes, index_sha256
_worker: dict = {}


def is_val(text: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of sha1(text) as a fraction of 2^64."""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") < fraction * 2**64


def _init_worker(tokenizer_path: str, settings: dict) -> None:
    # One thread per worker: parallelism comes from the processes, not from rayon inside each.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(settings, tokenizer=load_tokenizer(tokenizer_path))


def _encode(batch: list[Record]) -> tuple[int, list[tuple[str, bool, bytes, int]]]:
    """Worker stage: input bytes done, and per record ``(skip reason or "", is_val, npy bytes, n_tokens)``."""
    texts, out = [], []
    for rec in batch:
        text, reason = decode_record(rec, _worker["text_key"], _worker["on_bad_input"])
        out.append((reason, False, b"", 0))
        if text is not None:
            texts.append((len(out) - 1, text))
    encodings = _worker["tokenizer"].encode_batch([t for _, t in texts], add_special_tokens=False)
    dtype = _worker["dtype"]
    for (i, text), enc in zip(texts, encodings, strict=True):
        if not enc.ids:
            out[i] = ("empty", False, b"", 0)
            continue
        buf = io.BytesIO()
        np.save(buf, np.asarray(enc.ids, dtype=dtype), allow_pickle=False)
        out[i] = ("", is_val(text, _worker["val_fraction"]), buf.getvalue(), len(enc.ids))
    return batch[-1].done_bytes, out


def _batched(records: Iterable[Record], docs: int, size: int = 1 << 19) -> Iterator[list[Record]]:
    """Lists of at most ``docs`` records or about ``size`` payload bytes (long documents: fewer per batch)."""
    batch: list[Record] = []
    nbytes = 0
    for r in records:
        batch.append(r)
        nbytes += len(r.payload)
        if len(batch) == docs or nbytes >= size:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


class _HashingFile:
    """A write-only file that also feeds every byte to sha256 (no second pass over the shard)."""

    def __init__(self, path: Path) -> None:
        self._f, self.sha = open(path, "wb"), hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def _npy_data_start(npy: bytes) -> int:
    """Offset of the array data in ``.npy`` bytes (format 1.0: 2-byte header length, 2.0+: 4-byte)."""
    if npy[6] == 1:
        return 10 + int.from_bytes(npy[8:10], "little")
    return 12 + int.from_bytes(npy[8:12], "little")


class ShardWriter:
    """Writes ``<split>-NNNNN.tar`` shards of at most ``shard_tokens`` tokens each, plus index sidecars.

    Plain ustar members with fixed metadata (mtime 0, owner megalm), so equal
    inputs give equal bytes; webdataset reads them as ordinary shards. The sha256
    and the index (offset of each document's tokens, token count) are computed
    while writing.
    """

    def __init__(self, output: Path, split: str, shard_tokens: int) -> None:
        self.output, self.split, self.shard_tokens = output, split, shard_tokens
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self._index: list[tuple[int, int]] = []

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.tar"
        self._file = _HashingFile(self.output / name)
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index = []
        self.shards.append({"file": name, "split": self.split, "documents": 0, "tokens": 0})

    def write(self, npy: bytes, n_tokens: int) -> None:
        """Append one document (its ``.npy`` bytes)."""
        if self._tar is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self._open()
        shard = self.shards[-1]
        info = tarfile.TarInfo(f"{shard['file'].removesuffix('.tar')}-{shard['documents']:09d}{SUFFIX}")
        info.size, info.mode, info.uname, info.gname = len(npy), 0o444, "megalm", "megalm"
        header_at = self._tar.offset
        self._tar.addfile(info, io.BytesIO(npy))
        self._index.append((header_at + tarfile.BLOCKSIZE + _npy_data_start(npy), n_tokens))
        shard["documents"] += 1
        shard["tokens"] += n_tokens

    def close(self) -> None:
        """Finish the open shard: size, checksum and index sidecar (with its checksum)."""
        if self._tar is not None:
            self._tar.close()
            shard = self.shards[-1]
            shard["bytes"] = self._file.tell()
            self._file.close()
            shard["sha256"] = self._file.sha.hexdigest()
            buf = io.BytesIO()
            np.save(buf, np.array(self._index, dtype=np.int64).reshape(-1, 2), allow_pickle=False)
            (self.output / (shard["file"] + ".index.npy")).write_bytes(buf.getvalue())
            shard["index_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
            self._tar = self._file = None


def _write(
    results: Iterable[tuple[int, list]], writers: dict[str, ShardWriter], bar: tqdm, total_bytes: int
) -> dict:
    """Main stage: write documents in input order; count skips; keep the progress bar current."""
    stats, start = Counter(), time.perf_counter()
    for done_bytes, encoded in results:
        for reason, val, npy, n in encoded:
            if reason:
                stats[f"skipped_{reason}"] += 1
                continue
            writers["val" if val else "train"].write(npy, n)
            stats["documents"] += 1
            stats["tokens"] += n
        bar.update(done_bytes - bar.n)
        dt = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{stats['documents'] / dt:,.0f} docs/s, {stats['tokens'] / dt:,.0f} tok/s")
    bar.update(total_bytes - bar.n)
    return dict(stats)


def preprocess(
    inputs: list[str],
    tokenizer: str | Path,
    output: Path,
    text_key: str = "text",
    workers: int = 1,
    shard_tokens: int = 50_000_000,
    val_fraction: float = 0.0,
    batch_docs: int = 64,
    on_bad_input: str = "raise",
    progress: bool | None = None,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``inputs`` into shards published at ``output``; returns the manifest dict.

    Raises:
        InputError: unreadable inputs, no documents, bad input under ``on_bad_input="raise"``,
            or an ``output`` that must not be replaced (see :func:`data_tools.publish.check_output`).
    """
    check_output(output, overwrite)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    if tok.token_to_id(EOS) is None:
        raise InputError(
            f"tokenizer {tokenizer} has no {EOS} token; train it with data_tools.train_tokenizer"
        )
    tok_src = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)
    settings = {
        "text_key": text_key,
        "on_bad_input": on_bad_input,
        "val_fraction": val_fraction,
        "dtype": dtype,
    }
    with staged_output(output, overwrite) as stage:
        shutil.copyfile(tok_src, stage / "tokenizer.json")
        writers = {s: ShardWriter(stage, s, shard_tokens) for s in ("train", "val")}
        stats = _tokenize(files, str(tok_src), settings, writers, workers, batch_docs, progress)
        skipped = {k[len("skipped_") :]: v for k, v in sorted(stats.items()) if k.startswith("skipped_")}
        if not stats.get("documents"):
            counts = "".join(f"; skipped: {n} {k}" for k, n in skipped.items())
            raise InputError(
                f"the inputs {inputs} hold no non-empty documents (text key '{text_key}'{counts})"
            )
        return write_manifest(stage, tok, dtype, writers, skipped)


def _tokenize(
    files: list[Path],
    tok_src: str,
    settings: dict,
    writers: dict,
    workers: int,
    batch_docs: int,
    progress: bool | None,
) -> dict:
    """The pipeline of the module docstring; closes the writers and returns the counts."""
    total_bytes = sum(f.stat().st_size for f in files)
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=None if progress is None else not progress,
    )  # None: only on a terminal
    ahead = 4 * max(1, workers)  # read ahead a few batches, not the corpus
    stop = threading.Event()
    with mp.get_context("spawn").Pool(max(1, workers), _init_worker, (tok_src, settings)) as pool:
        batches = _batched(read_records(files, settings["text_key"]), batch_docs)
        try:
            stats = _write(bounded_imap(pool, _encode, batches, ahead, stop), writers, bar, total_bytes)
        finally:
            stop.set()  # a bad record raised: the pool's exit joins its task thread, which waits for a slot
    bar.close()
    for w in writers.values():
        w.close()
    return stats


def write_manifest(output: Path, tok, dtype: np.dtype, writers: dict, skipped: dict, **extra) -> dict:
    """Write ``output/manifest.json`` for closed train/val ``ShardWriter`` s; returns the manifest."""
    manifest = {
        "version": MANIFEST_VERSION,
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": sha256_file(output / "tokenizer.json"),
            "vocab_size": tok.get_vocab_size(),
            "eos_id": tok.token_to_id(EOS),
            "pad_id": tok.token_to_id(PAD),
        },
        "dtype": dtype.name,
        "skipped": skipped,
        **extra,
        "shards": writers["train"].shards + writers["val"].shards,
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a directory holding one")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=max(1, mp.cpu_count()))
    p.add_argument("--shard-tokens", type=int, default=50_000_000)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a data set already in --output (the old one stays readable until the new one "
        "is complete)",
    )
    p.add_argument(
        "--on-bad-input",
        choices=("raise", "skip"),
        default="raise",
        help="invalid JSON, a missing text field, non-UTF-8 bytes: stop (naming file:line) or skip "
        "and count; empty documents are always skipped and counted",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = preprocess(
            args.input,
            args.tokenizer,
            args.output,
            args.text_key,
            args.workers,
            args.shard_tokens,
            args.val_fraction,
            on_bad_input=args.on_bad_input,
            overwrite=args.overwrite,
        )
    except InputError as e:
        raise SystemExit(bad_input(e)) from None
    for split in ("train", "val"):
        shards = [s for s in m["shards"] if s["split"] == split]
        print(
            f"{split}: {len(shards)} shards, {sum(s['documents'] for s in shards)} documents, "
            f"{sum(s['tokens'] for s in shards):,} tokens"
        )
    if m["skipped"]:
        print("skipped: " + ", ".join(f"{n} {k}" for k, n in m["skipped"].items()))
    print(f"wrote {args.output}/manifest.json in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
