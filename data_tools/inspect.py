"""Look inside a shard directory: manifest summary, token histogram, decoded samples, checksums.

Usage: ``python -m data_tools.inspect DIR [--samples 3] [--chars 200] [--no-verify]``

Exit status 1 when a shard is missing, fails its sha256 or cannot be read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from megalm.data.shards import DataError, ShardDocuments, load_manifest, sha256_file


def check_shards(root: Path) -> list[str]:
    """One line per problem (missing shard, sha256 mismatch, unreadable tar); empty when all is well."""
    manifest = load_manifest(root)
    problems = []
    for shard in manifest.shards:
        path = root / shard["file"]
        if not path.is_file():
            problems.append(f"MISSING  {shard['file']}")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"SHA256   {shard['file']} (corrupt or replaced)")
    for split in ("train", "val"):
        try:
            ShardDocuments(manifest, split, verify=False)
        except DataError as e:
            if "missing" not in str(e):
                problems.append(f"READ     {e}")
    return problems


def histogram(lengths: np.ndarray, bins: int = 8, width: int = 40) -> list[str]:
    """Document-length histogram (tokens, log-spaced bins) as text lines."""
    if len(lengths) == 0:
        return ["(no documents)"]
    edges = np.unique(np.geomspace(max(1, lengths.min()), lengths.max() + 1, bins + 1).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(1, counts.max())
    return [
        f"{lo:>9,}-{hi - 1:<9,} {c:>8,} {'#' * int(round(width * c / top))}"
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def inspect(root: Path, samples: int = 3, chars: int = 200, verify: bool = True) -> tuple[str, bool]:
    """The report text and whether every check passed."""
    manifest = load_manifest(root)
    lines = [f"{root}: dtype {manifest.dtype}, vocab {manifest.vocab_size}, eos {manifest.eos_id}"]
    problems = check_shards(root) if verify else []
    for split in ("train", "val"):
        shards = manifest.split(split)
        lines.append(
            f"{split:>5}: {len(shards)} shards, {sum(s['documents'] for s in shards):,} documents, "
            f"{sum(s['tokens'] for s in shards):,} tokens"
        )
    if problems:
        return "\n".join([*lines, "checks: FAILED", *problems]), False
    docs = ShardDocuments(manifest, "train", verify=False)
    lines += ["document lengths (train, tokens):", *histogram(docs.lengths)]
    if samples and len(docs):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(manifest.tokenizer_file))
        head = np.concatenate([docs.document(i) for i in range(min(len(docs), 1000))])
        freq = np.bincount(head, minlength=manifest.vocab_size)
        top = np.argsort(-freq, kind="stable")[:10]
        lines.append(
            f"most frequent tokens (first {len(head):,}): "
            + ", ".join(f"{tok.id_to_token(int(t))!r} {freq[t] / len(head):.1%}" for t in top)
        )
        for i in np.linspace(0, len(docs) - 1, min(samples, len(docs))).astype(int):
            text = tok.decode(docs.document(int(i)).tolist())
            lines.append(f"--- train document {i} ({docs.lengths[i]} tokens) ---\n{text[:chars]}")
    lines.append("checks: sha256 and readability OK" if verify else "checks: skipped (--no-verify)")
    return "\n".join(lines), True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--chars", type=int, default=200)
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args(argv)
    try:
        report, ok = inspect(args.dir, args.samples, args.chars, not args.no_verify)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(report)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
