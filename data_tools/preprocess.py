"""Tokenize documents in parallel into webdataset ``.tar`` shards plus ``manifest.json``.

One sample per document: ``<key>.ids.npy`` holds its token ids (uint16 when the
vocabulary fits, else uint32; no EOS — the loader inserts it between documents).
A document goes to the validation split when a hash of its text falls under
``--val-fraction``, so the split does not depend on input order or worker count.
Same inputs and settings give byte-identical shards (fixed tar metadata, ordered
results).

Usage::

    python -m data_tools.preprocess --input PATH... --tokenizer T --output DIR \\
        [--text-key text] [--workers N] [--shard-tokens N] [--val-fraction F]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data_tools.inputs import InputError, expand_inputs, read_documents
from data_tools.train_tokenizer import EOS, PAD, load_tokenizer

MANIFEST_VERSION = 1
_worker_tokenizer = None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_val(text: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of sha1(text) as a fraction of 2^64."""
    if fraction <= 0:
        return False
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") < fraction * 2**64


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(batch: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tokenizer.encode_batch(batch, add_special_tokens=False)]


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardWriter:
    """Writes ``<split>-NNNNN.tar`` shards of at most ``shard_tokens`` tokens each."""

    def __init__(self, output: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.output, self.split, self.dtype, self.shard_tokens = output, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._stream = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.tar"
        self._stream = open(self.output / name, "wb")
        self._writer = wds.TarWriter(self._stream, mtime=0.0, user="megalm", group="megalm")
        self.shards.append({"file": name, "split": self.split, "documents": 0, "tokens": 0})

    def write(self, ids: list[int]) -> None:
        if self._writer is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self._open()
        shard = self.shards[-1]
        buf = io.BytesIO()
        np.save(buf, np.asarray(ids, dtype=self.dtype), allow_pickle=False)
        self._writer.write({"__key__": f"{shard['documents']:09d}", "ids.npy": buf.getvalue()})
        shard["documents"] += 1
        shard["tokens"] += len(ids)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = None
            shard = self.shards[-1]
            shard["sha256"] = sha256_file(self.output / shard["file"])


def preprocess(
    inputs: list[str],
    tokenizer: str | Path,
    output: Path,
    text_key: str = "text",
    workers: int = 1,
    shard_tokens: int = 50_000_000,
    val_fraction: float = 0.0,
    batch_docs: int = 64,
) -> dict:
    """Tokenize ``inputs`` into shards under ``output``; returns the manifest dict."""
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size()
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    if eos_id is None:
        raise InputError(
            f"tokenizer {tokenizer} has no {EOS} token; train it with data_tools.train_tokenizer"
        )
    output.mkdir(parents=True, exist_ok=True)
    tok_src = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
    if tok_src.resolve() != (output / "tokenizer.json").resolve():
        shutil.copyfile(tok_src, output / "tokenizer.json")
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    writers = {s: ShardWriter(output, s, dtype, shard_tokens) for s in ("train", "val")}

    docs = list(read_documents(files, text_key))
    if not docs:
        raise InputError(f"the inputs {inputs} hold no non-empty documents (text key '{text_key}')")
    batches = list(_batched(docs, batch_docs))
    start, n_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(docs), unit="doc", desc="tokenize", disable=None)
    with mp.get_context("spawn").Pool(max(1, workers), _init_worker, (str(tok_src),)) as pool:
        for texts, ids_list in zip(batches, pool.imap(_encode, batches), strict=True):
            for text, ids in zip(texts, ids_list, strict=True):
                if ids:
                    writers["val" if is_val(text, val_fraction) else "train"].write(ids)
                    n_tokens += len(ids)
            bar.update(len(texts))
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - start):,.0f}")
    bar.close()
    for w in writers.values():
        w.close()
    manifest = {
        "version": MANIFEST_VERSION,
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": sha256_file(output / "tokenizer.json"),
            "vocab_size": vocab,
            "eos_id": eos_id,
            "pad_id": pad_id,
        },
        "dtype": dtype.name,
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
        )
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    for split in ("train", "val"):
        shards = [s for s in m["shards"] if s["split"] == split]
        print(
            f"{split}: {len(shards)} shards, {sum(s['documents'] for s in shards)} documents, "
            f"{sum(s['tokens'] for s in shards):,} tokens"
        )
    print(f"wrote {args.output}/manifest.json in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
