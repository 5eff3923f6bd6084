"""Remote data.dir: the same windows as the local set, per-rank fetching, a shared LRU cache, faults.

A threaded HTTP server on 127.0.0.1 (tests/shard_server.py) serves a preprocessed
data set; the loader fetches through webdataset's ``Pipe`` opener (curl), exactly as
a training run does.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.preprocess import preprocess
from megalm.config.schema import DataConfig
from megalm.data import (
    CorruptFile,
    DataError,
    FetchError,
    GlobalOrderSampler,
    ShardCache,
    TrainBatches,
    load_manifest,
    open_split,
    open_train_batches,
)
from tests.shard_server import ShardServer

T, SEED, GB = 32, 5, 16


@pytest.fixture(scope="module")
def fine_dir(corpus_dir, tokenizer_path, tmp_path_factory) -> Path:
    """The test corpus in many small shards (so a few steps read only some of them)."""
    out = tmp_path_factory.mktemp("fine") / "shards"
    preprocess([str(corpus_dir)], tokenizer_path, out, shard_tokens=20_000, val_fraction=0.1)
    return out


@pytest.fixture
def server(fine_dir):
    with ShardServer(fine_dir) as s:
        yield s


def config(url: str, cache: Path, **kw) -> DataConfig:
    return DataConfig(dir=url, seed=SEED, cache_dir=str(cache), **kw)


def rows(loader: TrainBatches, steps: int) -> list[list[int]]:
    return [row for _ in range(steps) for x, *_ in loader.step_batches() for row in x.tolist()]


def loader(data: DataConfig, manifest, dp: int = 1, rank: int = 0, micro: int = 4) -> TrainBatches:
    return open_train_batches(data, manifest, T, GB, micro, rank, dp)


def drain(run: TrainBatches) -> None:
    """Let the background prefetches finish (they must not outlive the test's server)."""
    for w in run.sources:
        if w.remote:
            w.docs.manifest.cache.drain()


def tar_gets(server: ShardServer) -> dict[str, int]:
    return {k: v for k, v in server.gets.items() if k.endswith(".tar")}


def rank_windows(n: int, steps: range, dp: int, rank: int, micro: int) -> np.ndarray:
    """The windows rank ``rank`` reads in ``steps`` (the loader's rule, written out as the spec)."""
    order = GlobalOrderSampler(n, SEED).indices(steps.start * GB, len(steps) * GB).reshape(len(steps), GB)
    mine = [j * micro * dp + rank * micro + k for j in range(GB // (micro * dp)) for k in range(micro)]
    return order[:, mine].ravel()


def shards_of(windows, idx: np.ndarray) -> set[str]:
    docs = windows.docs
    return {docs.entries[s]["file"] for w in idx for s in docs.shard_of[list(windows.documents_of(int(w)))]}


@pytest.mark.parametrize(("dp", "workers"), [(1, 0), (2, 0), (2, 2)])
def test_remote_batches_equal_local_batches(fine_dir, server, tmp_path, dp, workers):
    local_cfg = DataConfig(dir=str(fine_dir), seed=SEED, workers=workers)
    local = [loader(local_cfg, load_manifest(fine_dir), dp, r) for r in range(dp)]
    data = config(server.url, tmp_path / "cache", workers=workers)
    remote = [loader(data, load_manifest(server.url, data), dp, r) for r in range(dp)]
    for _ in range(6):
        assert [rows(r, 1) for r in remote] == [rows(r, 1) for r in local]
    for r in remote:
        r.close()
        drain(r)
    val = open_split(load_manifest(server.url, data), "val", T)
    assert np.array_equal(val.window(3), open_split(load_manifest(fine_dir), "val", T).window(3))


def test_a_rank_fetches_only_the_shards_its_windows_read(fine_dir, server, tmp_path):
    data = config(server.url, tmp_path / "cache")
    m = load_manifest(server.url, data)
    run = loader(data, m, dp=2, rank=0, micro=2)
    rows(run, 3)
    n_train = len(m.split("train"))
    needed = shards_of(run.sources[0], rank_windows(len(run.sources[0]), range(0, 3), 2, 0, 2))
    lookahead = shards_of(run.sources[0], rank_windows(len(run.sources[0]), range(3, 4), 2, 0, 2))
    drain(run)
    got = tar_gets(server)
    print(f"{len(got)} of {n_train} train shards fetched; {len(needed)} needed, +{len(lookahead)} ahead")
    assert needed <= got.keys() <= needed | lookahead  # what it read, plus at most the prefetched next step
    assert len(got) < n_train and set(got.values()) == {1}  # not everything, and nothing twice
    others = server.gets.keys() - got
    assert all(k.endswith(".index.npy") or k in ("manifest.json", "tokenizer.json") for k in others)


def test_resume_with_an_empty_cache_refetches_only_what_it_reads(fine_dir, server, tmp_path):
    data = config(server.url, tmp_path / "a")
    first = loader(data, load_manifest(server.url, data))
    reference = loader(DataConfig(dir=str(fine_dir), seed=SEED), load_manifest(fine_dir))
    assert rows(first, 4) == rows(reference, 4)
    state = json.loads(json.dumps(first.state_dict()))
    server.gets.clear()
    data = config(server.url, tmp_path / "b")
    resumed = loader(data, load_manifest(server.url, data))
    resumed.load_state_dict(state)
    assert rows(resumed, 2) == rows(reference, 2)
    drain(first)
    drain(resumed)
    windows = resumed.sources[0]
    needed = shards_of(windows, rank_windows(len(windows), range(4, 6), 1, 0, 4))
    ahead = shards_of(windows, rank_windows(len(windows), range(6, 7), 1, 0, 4))
    assert needed <= tar_gets(server).keys() <= needed | ahead


def _read_everything(url: str, cache: str) -> int:
    data = DataConfig(dir=url, cache_dir=cache)
    windows = open_split(load_manifest(url, data), "train", T)
    return int(sum(windows.window(i).sum() for i in range(len(windows))))


def test_ranks_of_a_node_share_one_cache_and_fetch_each_shard_once(fine_dir, server, tmp_path):
    with mp.get_context("spawn").Pool(2) as pool:
        sums = pool.starmap(_read_everything, [(server.url, str(tmp_path / "cache"))] * 2)
    local = open_split(load_manifest(fine_dir), "train", T)
    assert sums == [int(sum(local.window(i).sum() for i in range(len(local))))] * 2
    n_train = len(load_manifest(fine_dir).split("train"))
    assert len(tar_gets(server)) == n_train and set(tar_gets(server).values()) == {1}


@pytest.mark.parametrize("fault", ["drop", "500", "corrupt"])
def test_a_transient_fault_is_retried_and_no_bad_byte_is_read(fine_dir, server, tmp_path, fault, capsys):
    m_local = load_manifest(fine_dir)
    victim = m_local.split("train")[0]["file"]
    server.fail(victim, fault)
    data = config(server.url, tmp_path / "cache")
    windows = open_split(load_manifest(server.url, data), "train", T)
    local = open_split(m_local, "train", T)
    first = [i for i in range(len(local)) if 0 in local.docs.shard_of[list(local.documents_of(i))]]
    assert all(np.array_equal(windows.window(i), local.window(i)) for i in first)
    assert server.gets[victim] == 2
    warning = capsys.readouterr().out
    expected = {"drop": "curl: (18) transfer closed", "500": "returned error: 500", "corrupt": "sha256 check"}
    assert expected[fault] in warning
    print(warning.strip())
    cached = ShardCache.from_config(data).cached_shards()
    assert not [p for p in (tmp_path / "cache" / "shards").iterdir() if ".tmp-" in p.name]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in cached)


@pytest.mark.parametrize(
    ("faults", "error", "message"),
    [
        (["500"] * 3, FetchError, r"fetching {url} failed after 3 attempts \(curl: \(22\) .*500\)"),
        (["drop"] * 3, FetchError, r"fetching {url} failed after 3 attempts \(curl: \(18\)"),
        (["404"], FetchError, r"{url} does not exist \(curl: \(22\) .*404\)"),
        (["corrupt"] * 2, CorruptFile, r"{url} fails its sha256 check on two fetches"),
    ],
)
def test_a_lasting_fault_is_one_error_naming_the_url(fine_dir, server, tmp_path, faults, error, message):
    victim = load_manifest(fine_dir).split("train")[0]["file"]
    data = config(server.url, tmp_path / "cache", fetch_retries=2)
    windows = open_split(load_manifest(server.url, data), "train", T)
    server.fail(victim, *faults)
    url = f"{server.url}/{victim}"
    with pytest.raises(error, match=message.format(url=url)) as e:
        windows.docs.document(0)  # the first document lives in the first shard
    print(f"error: {e.value}")
    assert "\n" not in str(e.value)


def test_a_corrupt_shard_is_skipped_up_front_and_counted_under_skip(fine_dir, server, tmp_path):
    victim = load_manifest(fine_dir).split("train")[1]["file"]
    server.fail(victim, "corrupt", "corrupt")
    data = config(server.url, tmp_path / "cache", on_bad_data="skip")
    run = loader(data, load_manifest(server.url, data))
    assert run.skipped == [{"shards": [victim], "documents": []}]
    assert victim not in {p.name.split("-", 1)[1] for p in ShardCache.from_config(data).cached_shards()}
    rows(run, 2)  # trains on the rest
    drain(run)


def test_missing_manifest_and_unsafe_names_are_refused(fine_dir, server, tmp_path):
    data = config(server.url + "/nowhere", tmp_path / "cache")
    with pytest.raises(DataError, match=f"no manifest.json at {server.url}/nowhere/manifest.json"):
        load_manifest(data.dir, data)
    evil = tmp_path / "evil"
    shutil.copytree(fine_dir, evil)
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../etc/passwd"
    (evil / "manifest.json").chmod(0o644)
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with ShardServer(evil) as s, pytest.raises(DataError, match="'../../etc/passwd' .* is not a plain file"):
        load_manifest(s.url, config(s.url, tmp_path / "cache"))


def test_lru_eviction_keeps_the_cache_under_cache_gb(fine_dir, server, tmp_path):
    m_local = load_manifest(fine_dir)
    first, second, third = m_local.split("train")[:3]
    room = first["bytes"] + third["bytes"] + 100  # the first and the third fit, not all three
    data = config(server.url, tmp_path / "cache", cache_gb=room / 2**30)
    cache = ShardCache.from_config(data)
    get = [(f"{server.url}/{s['file']}", s["file"], s["sha256"]) for s in (first, second, third)]
    a = cache.get(*get[0])
    time.sleep(0.05)
    b = cache.get(*get[1])
    time.sleep(0.05)
    os.utime(a)  # the first is used again: now the second is the least recently used
    time.sleep(0.05)
    c = cache.get(*get[2])
    assert a.exists() and not b.exists() and c.exists()
    assert sum(p.stat().st_size for p in cache.cached_shards()) <= cache.capacity
    # A reader on a small cache still sees the right data: evicted shards come back on demand.
    windows = open_split(load_manifest(server.url, data), "train", T)
    local = open_split(m_local, "train", T)
    assert all(np.array_equal(windows.window(i), local.window(i)) for i in range(0, len(local), 7))
    assert sum(p.stat().st_size for p in cache.cached_shards()) <= cache.capacity


def test_an_orphaned_partial_download_is_removed(fine_dir, server, tmp_path):
    data = config(server.url, tmp_path / "cache")
    cache = ShardCache.from_config(data)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = cache.root / "shards" / f"x-train-00000.tar.tmp-{dead.pid}-1"
    orphan.write_bytes(b"half")
    shard = load_manifest(fine_dir).split("train")[0]
    cache.get(f"{server.url}/{shard['file']}", shard["file"], shard["sha256"])
    assert not orphan.exists()


def test_pipe_and_object_store_urls_read_the_same_data(fine_dir, tmp_path, monkeypatch):
    """``pipe:`` runs a shell command; s3:// and gs:// run ``aws`` / ``gsutil`` (fakes on PATH here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"aws": 'cat "$ROOT/${4#s3://bucket/shards/}"', "gsutil": 'cat "$ROOT/${3#gs://bucket/shards/}"'}
    for tool, body in fakes.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ROOT", str(fine_dir))
    local = open_split(load_manifest(fine_dir), "train", T)
    urls = (f"pipe:cat {fine_dir}/{{}}", f"pipe:cat {fine_dir}", "s3://bucket/shards", "gs://bucket/shards")
    for k, url in enumerate(urls):
        data = config(url, tmp_path / f"cache{k}")
        windows = open_split(load_manifest(url, data), "train", T)
        assert all(np.array_equal(windows.window(i), local.window(i)) for i in range(0, len(local), 11)), url
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="s3:// data needs the `aws` command-line tool"):
        load_manifest("s3://bucket/shards", config("s3://x", tmp_path / "c"))


def test_blend_mixes_a_remote_and_a_local_data_set(fine_dir, server, tmp_path):
    data = config(server.url, tmp_path / "cache", blend=f"1:{server.url},1:{fine_dir}")
    run = loader(data, load_manifest(server.url, data))
    assert len(run.sources) == 2 and run.sources[0].remote and not run.sources[1].remote
    assert len(rows(run, 2)) == 2 * GB
    drain(run)
