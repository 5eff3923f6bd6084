"""Offline tools: every input format, bad-input policies, inspect, Megatron .bin/.idx interop."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.inputs import InputError
from data_tools.megatron import MegatronWriter, export_megatron, import_megatron, read_megatron
from data_tools.preprocess import preprocess
from megalm.data import ShardDocuments, load_manifest, read_documents
from tests.conftest import PYTHON, run_checkout


@pytest.fixture(scope="module")
def texts(corpus_dir) -> list[str]:
    lines = (corpus_dir / "stdlib.jsonl").read_text().splitlines()[:24]
    return [json.loads(line)["text"] for line in lines]


def write_inputs(root: Path, texts: list[str]) -> dict[str, Path]:
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst, .parquet and a directory of .txt files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    paths = {
        "jsonl": root / "a.jsonl",
        "gz": root / "a.jsonl.gz",
        "zst": root / "a.jsonl.zst",
        "parquet": root / "a.parquet",
        "txt": root / "txt",
    }
    paths["jsonl"].write_bytes(lines)
    paths["gz"].write_bytes(gzip.compress(lines, mtime=0))
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": texts}), paths["parquet"], row_group_size=5)
    paths["txt"].mkdir()
    for i, t in enumerate(texts):
        (paths["txt"] / f"{i:03d}.txt").write_text(t)
    return paths


def test_every_input_format_gives_byte_identical_shards(texts, tokenizer_path, tmp_path):
    paths = write_inputs(tmp_path / "in", texts)
    ref = None
    for name, path in paths.items():
        m = preprocess(
            [str(path)], tokenizer_path, tmp_path / name, workers=2, shard_tokens=20_000, val_fraction=0.2
        )
        files = {s["file"]: (tmp_path / name / s["file"]).read_bytes() for s in m["shards"]}
        assert ref is None or (m["shards"], files) == ref, name
        ref = (m["shards"], files)
    assert len(ref[0]) >= 3 and {s["split"] for s in ref[0]} == {"train", "val"}


def test_non_utf8_and_empty_documents_raise_or_are_counted(tokenizer_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine document"}\n{"text": "caf\xe9"}\n{"text": "   "}\n{"text": "more"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not UTF-8"):
        preprocess([str(bad)], tokenizer_path, tmp_path / "a")
    m = preprocess([str(bad)], tokenizer_path, tmp_path / "b", on_bad_input="skip")
    assert m["skipped"] == {"empty": 1, "non_utf8": 1}
    assert len(read_documents(load_manifest(tmp_path / "b"), "train")) == 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:2: not valid JSON"):
        preprocess([str(broken)], tokenizer_path, tmp_path / "c")
    assert preprocess([str(broken)], tokenizer_path, tmp_path / "d", on_bad_input="skip")["skipped"] == {
        "bad_json": 1
    }


def test_a_bad_record_ahead_of_a_long_input_is_one_error_line_not_a_hang(tokenizer_path, tmp_path):
    """The bad record is first and more than the read-ahead (4 batches of 64 per worker) follows,
    so the pool's task thread is waiting for a slot when the error reaches the main process; the
    pool's exit must stop it (it hung there before ``bounded_imap`` took a stop event)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n" + "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(2000)))
    r = run_checkout(
        [PYTHON, "-m", "data_tools.preprocess", "--input", str(bad), "--tokenizer", str(tokenizer_path)]
        + ["--output", str(tmp_path / "out"), "--workers", "1"],
        120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"error: {bad}:1: not valid JSON (Expecting property name enclosed in double quotes)"
    ]
    assert not (tmp_path / "out").exists()


def run_inspect(path: Path) -> subprocess.CompletedProcess:
    return run_checkout([PYTHON, "-m", "data_tools.inspect", str(path)], 120)


def test_inspect_summarises_and_verifies_checksums(shards_dir, tmp_path):
    ok = run_inspect(shards_dir)
    assert ok.returncode == 0, ok.stderr
    m = load_manifest(shards_dir)
    n_train = sum(s["documents"] for s in m.split("train"))
    assert f"train: {len(m.split('train'))} shards, {n_train:,} documents" in ok.stdout
    assert "document lengths" in ok.stdout and "--- train document 0" in ok.stdout
    assert "checks: sha256 and readability OK" in ok.stdout
    shutil.copytree(shards_dir, tmp_path / "bad")
    victim = tmp_path / "bad" / m.split("val")[0]["file"]
    victim.chmod(0o644)  # published shards are read-only
    victim.write_bytes(victim.read_bytes()[:-700])
    bad = run_inspect(tmp_path / "bad")
    assert bad.returncode == 1 and f"SHA256   {victim.name}" in bad.stdout


def test_megatron_export_import_round_trip(shards_dir, tokenizer_path, tmp_path):
    n = export_megatron(shards_dir, str(tmp_path / "mt"), "train")
    docs = read_documents(load_manifest(shards_dir), "train")
    eos = load_manifest(shards_dir).eos_id
    exported = list(read_megatron(tmp_path / "mt"))
    assert n == len(docs) == len(exported)
    assert all(np.array_equal(e, np.append(d, eos)) for e, d in zip(exported, docs, strict=True))
    m = import_megatron(str(tmp_path / "mt"), tokenizer_path, tmp_path / "back", shard_tokens=150_000)
    back = read_documents(load_manifest(tmp_path / "back"), "train")
    assert all(np.array_equal(a, b) for a, b in zip(back, docs, strict=True)) and len(back) == len(docs)
    assert [s["tokens"] for s in m["shards"]] == [
        s["tokens"] for s in load_manifest(shards_dir).split("train")
    ]


def test_megatron_files_match_megatron_core(shards_dir, tokenizer_path, tmp_path):
    """Our writer against megatron-core's reader, and megatron-core's writer against our reader."""
    idx = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    export_megatron(shards_dir, str(tmp_path / "ours"), "val")
    theirs = idx.IndexedDataset(str(tmp_path / "ours"))
    ours = list(read_megatron(tmp_path / "ours"))
    assert len(theirs) == len(ours) and all(np.array_equal(theirs[i], d) for i, d in enumerate(ours))
    builder = idx.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32)
    docs = ShardDocuments(load_manifest(shards_dir), "val")
    for i in range(len(docs)):  # two sequences per document, as Megatron's sentence splitting makes
        d = docs.document(i).astype(np.int32)
        builder.add_item(torch.from_numpy(d[: len(d) // 2].copy()))
        builder.add_item(torch.from_numpy(d[len(d) // 2 :].copy()))
        builder.end_document()
    builder.finalize(str(tmp_path / "mc.idx"))
    got = list(read_megatron(tmp_path / "mc"))
    assert all(np.array_equal(g, docs.document(i)) for i, g in enumerate(got)) and len(got) == len(docs)


def test_megatron_reader_keeps_empty_documents_and_rejects_other_files(tmp_path):
    w = MegatronWriter(tmp_path / "x", np.dtype(np.uint16))
    w.add_document(np.array([1, 2, 3]))
    w.add_document(np.array([], dtype=np.uint16))
    w.close()
    assert [d.tolist() for d in read_megatron(tmp_path / "x")] == [[1, 2, 3], []]
    (tmp_path / "y.idx").write_bytes(b"NOTANIDX" * 8)
    with pytest.raises(ValueError, match="not a Megatron MMIDIDX"):
        list(read_megatron(tmp_path / "y"))
