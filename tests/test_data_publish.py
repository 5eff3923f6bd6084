"""Safe re-preprocessing: a data set is published by rename only when complete, an existing one is
replaced only with --overwrite, and the old one stays readable until then, also to a reader that
memory-mapped it; a killed run changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.inputs import InputError
from data_tools.preprocess import preprocess
from megalm.data import load_manifest, open_split
from tests.conftest import PYTHON, ROOT, run_checkout, subprocess_env

T = 16


@pytest.fixture(scope="module")
def inputs(corpus_dir, tmp_path_factory) -> dict[str, Path]:
    """Two small, different corpora and one of only invalid UTF-8."""
    root = tmp_path_factory.mktemp("inputs")
    lines = (corpus_dir / "stdlib.jsonl").read_text().splitlines()
    (root / "a.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (root / "b.jsonl").write_text("\n".join(lines[30:50]) + "\n")
    (root / "bad.txt").write_bytes(b"\xff\xfe not text \xc3\x28")
    return {"a": root / "a.jsonl", "b": root / "b.jsonl", "bad": root / "bad.txt"}


def cli(*args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [PYTHON, "-m", "data_tools.preprocess", "--workers", "1", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), **popen)
    return run_checkout(cmd, 300)


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def all_windows(out: Path) -> np.ndarray:
    w = open_split(load_manifest(out), "train", T)
    return np.stack([w.window(i) for i in range(len(w))])


def test_an_existing_data_set_is_refused_without_overwrite(inputs, tokenizer_path, tmp_path):
    out = tmp_path / "shards"
    preprocess([str(inputs["a"])], tokenizer_path, out, shard_tokens=5_000)
    before = digests(out)
    proc = cli("--input", str(inputs["b"]), "--tokenizer", str(tokenizer_path), "--output", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --output '{out}' already holds a data set; pass --overwrite to replace it (the old set "
        "stays readable until the new one is complete) or choose another directory"
    ]
    assert digests(out) == before and not leftovers(out)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in out.iterdir())  # published read-only


def test_overwrite_swaps_in_the_new_set_while_a_reader_keeps_the_old_one(inputs, tokenizer_path, tmp_path):
    out = tmp_path / "shards"
    old = preprocess([str(inputs["a"])], tokenizer_path, out, shard_tokens=5_000)
    reader = open_split(load_manifest(out), "train", T)
    seen = np.stack([reader.window(i) for i in range(len(reader))])  # every old shard is mapped now
    new = preprocess([str(inputs["b"])], tokenizer_path, out, shard_tokens=5_000, overwrite=True)
    assert new["shards"] != old["shards"] and load_manifest(out).shards == new["shards"]
    assert np.array_equal(np.stack([reader.window(i) for i in range(len(reader))]), seen)  # no SIGBUS
    assert not np.array_equal(all_windows(out)[0], seen[0])
    assert not leftovers(out)


def test_a_failed_overwrite_leaves_the_previous_set_untouched(inputs, tokenizer_path, tmp_path):
    out = tmp_path / "shards"
    preprocess([str(inputs["a"])], tokenizer_path, out, shard_tokens=5_000)
    before = digests(out)
    with pytest.raises(InputError, match="not UTF-8"):
        preprocess([str(inputs["bad"])], tokenizer_path, out, overwrite=True)
    assert digests(out) == before and not leftovers(out)


def test_a_killed_overwrite_leaves_the_previous_set_loadable(inputs, corpus_dir, tokenizer_path, tmp_path):
    out = tmp_path / "shards"
    preprocess([str(inputs["a"])], tokenizer_path, out, shard_tokens=5_000)
    before, windows = digests(out), all_windows(out)
    big = tmp_path / "big.jsonl"  # a few seconds of work, so the kill lands mid-run
    big.write_text((corpus_dir / "stdlib.jsonl").read_text() * 3)
    args = ("--input", str(big), "--tokenizer", str(tokenizer_path), "--output", str(out))
    proc = cli(*args, "--overwrite", "--shard-tokens", "5000", start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.glob("train-00001.tar") for p in leftovers(out)) and time.monotonic() < deadline:
        assert proc.poll() is None, "preprocess finished before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its tokenizer workers
    assert proc.wait() == -signal.SIGKILL
    assert digests(out) == before and np.array_equal(all_windows(out), windows)
    assert [p.name.split("-")[0] for p in leftovers(out)] == [".shards.partial"]
    # The next run on that output cleans up what the killed one left.
    preprocess([str(inputs["b"])], tokenizer_path, out, shard_tokens=5_000, overwrite=True)
    assert not leftovers(out) and digests(out) != before


def test_outputs_that_must_not_be_replaced_are_refused(inputs, tokenizer_path, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds files that are not part of a megalm data set \(todo.txt\)"):
        preprocess([str(inputs["a"])], tokenizer_path, tmp_path / "notes", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file; give the path of a directory"):
        preprocess([str(inputs["a"])], tokenizer_path, tmp_path / "file")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_document_keys_are_unique_across_shards_and_splits(inputs, tokenizer_path, tmp_path):
    import webdataset as wds

    m = preprocess([str(inputs["a"])], tokenizer_path, tmp_path / "s", shard_tokens=5_000, val_fraction=0.3)
    urls = [str(tmp_path / "s" / s["file"]) for s in m["shards"]]
    keys = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]
    assert len(keys) == len(set(keys)) == sum(s["documents"] for s in m["shards"])
    assert {s["split"] for s in m["shards"]} == {"train", "val"} and len(urls) >= 4
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert all(s["bytes"] == (tmp_path / "s" / s["file"]).stat().st_size for s in manifest["shards"])
    for shard in manifest["shards"]:
        sidecar = (tmp_path / "s" / (shard["file"] + ".index.npy")).read_bytes()
        assert shard["index_sha256"] == hashlib.sha256(sidecar).hexdigest()
