"""Build the loaders a run needs from the ``data.*`` config keys."""

from __future__ import annotations

from pathlib import Path

from megalm.data.loader import TrainBatches
from megalm.data.packed import PackedWindows
from megalm.data.shards import BadData, DataError, Manifest, ShardDocuments, load_manifest


def open_split(
    manifest: Manifest, split: str, seq_len: int, on_bad_data: str = "raise", verify: bool = True
) -> PackedWindows | None:
    """The packed windows of one split, read through memory maps; ``None`` if it has no documents."""
    docs = ShardDocuments(manifest, split, BadData(on_bad_data), verify)
    if len(docs) == 0 or (docs.lengths.sum() + len(docs)) <= seq_len:
        return None
    return PackedWindows(docs, seq_len, manifest.eos_id)


def parse_blend(blend: str) -> list[tuple[float, str]]:
    """``"0.7:data/a,0.3:data/b"`` -> [(0.7, "data/a"), (0.3, "data/b")].

    Raises:
        DataError: an entry that is not ``weight:path``.
    """
    out = []
    for entry in filter(None, (e.strip() for e in blend.split(","))):
        weight, sep, path = entry.partition(":")
        try:
            out.append((float(weight), path))
        except ValueError:
            sep = ""
        if not sep or not path:
            raise DataError(f"data.blend entry '{entry}' is not weight:path (e.g. 0.7:data/a,0.3:data/b)")
    return out


def open_train_batches(
    data, manifest: Manifest, seq_len: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> TrainBatches:
    """The training loader for ``data`` (a ``DataConfig``): ``data.dir`` or the ``data.blend`` mix.

    Raises:
        DataError: an empty training split, a bad shard under ``on_bad_data=raise``, a
            blended dataset whose tokenizer differs from ``data.dir``'s.
    """
    entries = parse_blend(data.blend) or [(1.0, data.dir)]
    windows = []
    for _, path in entries:
        m = manifest if Path(path) == Path(data.dir) else load_manifest(path)
        if (m.vocab_size, m.eos_id) != (manifest.vocab_size, manifest.eos_id):
            raise DataError(
                f"data.blend dataset '{path}' uses another tokenizer (vocab {m.vocab_size}, "
                f"eos {m.eos_id}) than data.dir ({manifest.vocab_size}, {manifest.eos_id})"
            )
        w = open_split(m, "train", seq_len, data.on_bad_data, data.verify)
        if w is None:
            raise DataError(
                f"data.dir '{path}' has no training documents; re-run data_tools.preprocess "
                "on a non-empty corpus"
            )
        windows.append(w)
    return TrainBatches(
        windows,
        data.seed,
        global_batch,
        micro_batch,
        dp_rank,
        dp_size,
        weights=[w for w, _ in entries],
        workers=data.workers,
    )
