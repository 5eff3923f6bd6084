"""Build the loaders a run needs from the ``data.*`` config keys.

Every check of the data a run is about to use lives here or below (manifest,
shards, tokenizer agreement of a blend, enough tokens for one window), so the
trainer can open the data before it builds any process group and fail with one
:class:`DataError` line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megalm.data.cache import ShardCache
from megalm.data.loader import TrainBatches
from megalm.data.packed import PackedWindows
from megalm.data.remote import is_remote
from megalm.data.shards import BadData, DataError, Manifest, ShardDocuments, load_manifest


def open_split(
    manifest: Manifest, split: str, seq_len: int, on_bad_data: str = "raise", verify: bool = True
) -> PackedWindows | None:
    """The packed windows of one split, read through memory maps; ``None`` if it has no window."""
    return _windows(ShardDocuments(manifest, split, BadData(on_bad_data), verify), manifest, seq_len)


def _windows(docs: ShardDocuments, manifest: Manifest, seq_len: int) -> PackedWindows | None:
    if len(docs) == 0 or (docs.lengths.sum() + len(docs)) <= seq_len:
        return None
    return PackedWindows(docs, seq_len, manifest.eos_id)


def parse_blend(blend: str) -> list[tuple[float, str]]:
    """``"0.7:data/a,0.3:https://host/b"`` -> [(0.7, "data/a"), (0.3, "https://host/b")].

    Raises:
        DataError: an entry that is not ``weight:location``.
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


def same_location(a: str | Path, b: str | Path) -> bool:
    """Whether two ``data.dir`` values name the same data set (``a/`` and ``a`` are one)."""
    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a) == Path(b)


def check_tokenizer(
    m: Manifest, path: str, ref: Manifest, ref_path: str, role: str = "data.blend dataset"
) -> None:
    """Raises DataError if ``m`` was not built with ``ref``'s tokenizer (vocab, EOS, tokenizer.json).

    ``role``/``path`` name the data set in the message, ``ref_path`` the reference one."""
    facts, ref_facts = (m.vocab_size, m.eos_id), (ref.vocab_size, ref.eos_id)
    sha, ref_sha = m.tokenizer_sha256, ref.tokenizer_sha256
    if facts == ref_facts and (not sha or not ref_sha or sha == ref_sha):
        return
    raise DataError(
        f"{role} '{path}' was built with another tokenizer than data.dir '{ref_path}' "
        f"(tokenizer.json sha256 {sha[:12] or '?'} vs {ref_sha[:12] or '?'}, vocab {facts[0]} vs "
        f"{ref_facts[0]}, eos {facts[1]} vs {ref_facts[1]}); preprocess both with the same tokenizer"
    )


def _train_windows(m: Manifest, path: str, seq_len: int, data) -> PackedWindows:
    """The training windows of one data set, or a DataError saying why there are none."""
    docs = ShardDocuments(m, "train", BadData(data.on_bad_data), data.verify)
    if len(docs) == 0:
        raise DataError(
            f"data.dir '{path}' has no training documents; re-run data_tools.preprocess on a non-empty corpus"
        )
    windows = _windows(docs, m, seq_len)
    if windows is None:
        stream = int(docs.lengths.sum()) + len(docs)
        raise DataError(
            f"model.seq_len ({seq_len}) is longer than every training document of data.dir '{path}' "
            f"(the longest has {int(docs.lengths.max())} tokens) and than all {len(docs)} of them "
            f"packed together ({stream} tokens with separators), but one window needs seq_len + 1 = "
            f"{seq_len + 1}; lower model.seq_len or add data"
        )
    return windows


def with_cache(manifest: Manifest, data) -> Manifest:
    """``manifest`` reading through the cache ``data`` configures (remote data sets; else as is)."""
    if manifest.cache is None:
        return manifest
    cache = ShardCache.from_config(data)
    return manifest if cache.key == manifest.cache.key else dataclasses.replace(manifest, cache=cache)


def open_train_batches(
    data,
    manifest: Manifest,
    seq_len: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    cp_rank: int = 0,
    cp_size: int = 1,
) -> TrainBatches:
    """The training loader for ``data`` (a ``DataConfig``): ``data.dir`` or the ``data.blend`` mix,
    each window cut to cp rank ``cp_rank``'s tokens of ``cp_size`` (context parallelism); with
    ``data.document_mask`` its micro-batches carry position and document ids.

    Raises:
        DataError: an empty training split or one shorter than a window, a bad shard under
            ``on_bad_data=raise``, a blended dataset built with another tokenizer than ``data.dir``'s.
    """
    entries = parse_blend(data.blend) or [(1.0, data.dir)]
    manifest = with_cache(manifest, data)
    windows = []
    for _, path in entries:
        m = manifest if same_location(path, data.dir) else load_manifest(path, data)
        check_tokenizer(m, path, manifest, data.dir)
        windows.append(_train_windows(m, path, seq_len, data))
    return TrainBatches(
        windows,
        data.seed,
        global_batch,
        micro_batch,
        dp_rank,
        dp_size,
        weights=[w for w, _ in entries],
        workers=data.workers,
        with_ids=data.document_mask,
        cp_rank=cp_rank,
        cp_size=cp_size,
        prefetch=data.prefetch,
    )
