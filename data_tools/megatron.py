"""Megatron ``.bin/.idx`` indexed datasets <-> megalm shards, both ways.

The format (megatron-core ``datasets/indexed_dataset.py``, ``_IndexWriter``),
all little-endian: ``.idx`` = magic ``MMIDIDX\\x00\\x00``, version ``<Q`` 1,
dtype code ``<B`` (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
7 float32, 8 uint16), sequence count ``<Q``, document count ``<Q``, then
``int32[seq]`` sequence lengths, ``int64[seq]`` byte pointers into ``.bin``,
``int64[doc]`` document indices (sequence index where each document starts,
first 0, last = sequence count). ``.bin`` is the tokens back to back. Written and
read here with numpy (megatron-core's reader is used in the tests when installed).

A Megatron document (its sequences concatenated) becomes one megalm document.
Megatron-LM's ``preprocess_data.py --append-eod`` ends documents with EOD while
megalm's loader inserts EOS itself, so import drops one trailing EOS per
document and export appends one (``--no-eos`` to disable).

Usage::

    python -m data_tools.megatron import --input PREFIX --tokenizer T --output DIR [--val-fraction F]
    python -m data_tools.megatron export --input DIR --output PREFIX [--split train] [--no-eos]
"""

from __future__ import annotations

import argparse
import io
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_tools.preprocess import ShardWriter, write_manifest
from data_tools.train_tokenizer import EOS, load_tokenizer
from megalm.data.shards import ShardDocuments, load_manifest

MAGIC = b"MMIDIDX\x00\x00"
CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class MegatronWriter:
    """Write ``PREFIX.bin`` / ``PREFIX.idx``, one sequence per document."""

    def __init__(self, prefix: str | Path, dtype: np.dtype) -> None:
        self.prefix, self.dtype = str(prefix), np.dtype(dtype)
        self.code = next(c for c, t in CODES.items() if np.dtype(t) == self.dtype)
        self._bin = open(self.prefix + ".bin", "wb")
        self.lengths: list[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document as one sequence."""
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.lengths.append(len(tokens))

    def close(self) -> None:
        """Finish ``.bin`` and write ``.idx``."""
        self._bin.close()
        lengths = np.array(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self.prefix + ".idx", "wb") as f:
            f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", self.code))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
            f.write(
                lengths.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype=np.int64).tobytes()
            )


def read_megatron(prefix: str | Path) -> Iterator[np.ndarray]:
    """Yield the documents of ``PREFIX.bin/.idx`` (each = its sequences concatenated).

    Raises:
        ValueError: not a Megatron index (bad magic, version or dtype code).
    """
    idx = Path(f"{prefix}.idx")
    buf = np.memmap(idx, dtype=np.uint8, mode="r")
    header = bytes(buf[:34])
    if header[:9] != MAGIC or struct.unpack("<Q", header[9:17])[0] != 1 or header[17] not in CODES:
        raise ValueError(f"'{idx}' is not a Megatron MMIDIDX version-1 index")
    dtype = np.dtype(CODES[header[17]])
    n_seq, n_doc = struct.unpack("<QQ", header[18:34])
    lengths = np.frombuffer(buf, np.int32, n_seq, 34)
    pointers = np.frombuffer(buf, np.int64, n_seq, 34 + lengths.nbytes)
    doc_idx = np.frombuffer(buf, np.int64, n_doc, 34 + lengths.nbytes + pointers.nbytes)
    data = np.memmap(f"{prefix}.bin", dtype=np.uint8, mode="r")
    for d in range(len(doc_idx) - 1):
        seqs = range(int(doc_idx[d]), int(doc_idx[d + 1]))
        parts = [np.frombuffer(data, dtype, int(lengths[s]), int(pointers[s])) for s in seqs]
        yield np.concatenate(parts) if parts else np.empty(0, dtype)


def import_megatron(
    prefix: str,
    tokenizer: str | Path,
    output: Path,
    shard_tokens: int = 50_000_000,
    val_fraction: float = 0.0,
) -> dict:
    """Megatron ``PREFIX`` -> megalm shards + manifest under ``output``; returns the manifest.

    The val split takes every document whose index hashes under ``val_fraction``
    (deterministic), since the text is not at hand.
    """
    tok = load_tokenizer(tokenizer)
    vocab, eos_id = tok.get_vocab_size(), tok.token_to_id(EOS)
    output.mkdir(parents=True, exist_ok=True)
    tok_src = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
    shutil.copyfile(tok_src, output / "tokenizer.json")
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    writers = {s: ShardWriter(output, s, shard_tokens) for s in ("train", "val")}
    rng_cut = int(val_fraction * 2**32)  # Knuth multiplicative hash of the document index
    for i, doc in enumerate(read_megatron(prefix)):
        if len(doc) and doc[-1] == eos_id:
            doc = doc[:-1]
        if len(doc) and doc.max() >= vocab:
            raise ValueError(f"'{prefix}' document {i} has token {doc.max()} >= tokenizer vocab {vocab}")
        split = "val" if (i * 2654435761) % 2**32 < rng_cut else "train"
        buf = io.BytesIO()
        np.save(buf, doc.astype(dtype), allow_pickle=False)
        writers[split].write(buf.getvalue(), len(doc))
    for w in writers.values():
        w.close()
    return write_manifest(output, tok, dtype, writers, {}, source=f"megatron:{prefix}")


def export_megatron(root: Path, prefix: str, split: str = "train", append_eos: bool = True) -> int:
    """megalm shards of ``split`` -> ``PREFIX.bin/.idx``; returns the number of documents."""
    manifest = load_manifest(root)
    docs = ShardDocuments(manifest, split)
    dtype = np.dtype(manifest.dtype)
    writer = MegatronWriter(prefix, dtype)
    eos = np.array([manifest.eos_id], dtype=dtype)
    for i in range(len(docs)):
        doc = docs.document(i)
        writer.add_document(np.concatenate([doc, eos]) if append_eos else doc)
    writer.close()
    return len(docs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Megatron PREFIX.bin/.idx -> megalm shards")
    imp.add_argument("--input", required=True, help="path prefix (without .bin/.idx)")
    imp.add_argument("--tokenizer", required=True, help="the tokenizer the Megatron data was made with")
    imp.add_argument("--output", type=Path, required=True)
    imp.add_argument("--shard-tokens", type=int, default=50_000_000)
    imp.add_argument("--val-fraction", type=float, default=0.0)
    exp = sub.add_parser("export", help="megalm shards -> Megatron PREFIX.bin/.idx")
    exp.add_argument("--input", type=Path, required=True)
    exp.add_argument("--output", required=True, help="path prefix (without .bin/.idx)")
    exp.add_argument("--split", default="train")
    exp.add_argument("--no-eos", action="store_true", help="do not append EOS to each document")
    args = p.parse_args(argv)
    try:
        if args.cmd == "import":
            m = import_megatron(args.input, args.tokenizer, args.output, args.shard_tokens, args.val_fraction)
            print(f"wrote {len(m['shards'])} shards to {args.output}")
        else:
            n = export_megatron(args.input, args.output, args.split, not args.no_eos)
            print(f"wrote {n} documents to {args.output}.bin/.idx")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
