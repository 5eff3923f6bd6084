"""Training from a remote data.dir through launch/pretrain.py: the same losses as the local set, an
exact resume that fetches only what it reads, and one error line when the server fails.

An HTTP server in this process serves the shards; the training processes fetch them
with curl into ``$TMPDIR/megalm-cache-<uid>`` (``TMPDIR`` set per test, so each starts cold).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.preprocess import preprocess
from megalm.data import GlobalOrderSampler, load_manifest, open_split
from tests.conftest import tiny_overrides
from tests.launching import free_port, run_pretrain, step_losses
from tests.shard_server import ShardServer

pytestmark = pytest.mark.slow
STEPS = {"training.max_steps": 10, "training.eval_interval": 5, "training.save_interval": 5}
SEED, GB, T = 1234, 8, 64  # data.seed default; tiny_overrides' global batch and seq_len


@pytest.fixture(scope="module")
def fine_dir(corpus_dir, tokenizer_path, tmp_path_factory) -> Path:
    """The test corpus in ~90 train shards, so five steps read only some of them."""
    out = tmp_path_factory.mktemp("fine") / "shards"
    preprocess([str(corpus_dir)], tokenizer_path, out, shard_tokens=5_000, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def local_run(fine_dir, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("local")
    proc = run_pretrain(tiny_overrides(run_dir, fine_dir, **STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return step_losses(run_dir)


@pytest.fixture
def server(fine_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the training processes' default cache
    (tmp_path / "tmp").mkdir()
    with ShardServer(fine_dir) as s:
        yield s


def train_gets(server: ShardServer) -> dict[str, int]:
    return {k: v for k, v in server.gets.items() if k.startswith("train-") and k.endswith(".tar")}


def test_remote_run_trains_the_same_losses_as_local(local_run, server, tmp_path):
    proc = run_pretrain(tiny_overrides(tmp_path / "run", server.url, **STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(tmp_path / "run") == local_run  # bit-equal, every step


def test_remote_torchrun_dp2_trains_the_same_losses_as_local(fine_dir, server, tmp_path):
    run_pretrain(tiny_overrides(tmp_path / "local", fine_dir, **STEPS), "torchrun", 2)
    run_pretrain(tiny_overrides(tmp_path / "remote", server.url, **STEPS), "torchrun", 2)
    local, remote = step_losses(tmp_path / "local"), step_losses(tmp_path / "remote")
    assert sorted(remote) == list(range(1, 11)) and remote == local
    assert set(train_gets(server).values()) == {1}  # two ranks, one node cache: each shard fetched once


def test_resume_with_an_empty_cache_equals_the_uninterrupted_run_and_fetches_only_what_it_reads(
    fine_dir, local_run, server, tmp_path
):
    run_dir = tmp_path / "run"
    first = run_pretrain(tiny_overrides(run_dir, server.url, **{**STEPS, "training.max_steps": 5}))
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(tmp_path / "tmp")  # a new node: the cache is empty
    (tmp_path / "tmp").mkdir()
    server.gets.clear()
    second = run_pretrain(tiny_overrides(run_dir, server.url, **STEPS))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000005" in second.stdout
    resumed = step_losses(run_dir)
    assert [resumed[s] for s in range(6, 11)] == [local_run[s] for s in range(6, 11)]  # bit-equal
    windows = open_split(load_manifest(fine_dir), "train", T)
    order = GlobalOrderSampler(len(windows), SEED).indices(5 * GB, 6 * GB)
    needed, ahead = _shards(windows, order[: 5 * GB]), _shards(windows, order[5 * GB :])
    got = train_gets(server)
    n_train = len(load_manifest(fine_dir).split("train"))
    print(f"resume fetched {len(got)} of {n_train} train shards: {len(needed)} read, {len(ahead)} ahead")
    assert needed <= got.keys() <= needed | ahead and set(got.values()) == {1}
    assert len(got) < n_train


def _shards(windows, idx: np.ndarray) -> set[str]:
    docs = windows.docs
    return {docs.entries[s]["file"] for w in idx for s in docs.shard_of[list(windows.documents_of(int(w)))]}


@pytest.mark.parametrize("where", ["manifest", "shard"])
def test_a_failing_server_is_one_error_line_naming_the_url(fine_dir, server, tmp_path, where):
    if where == "manifest":
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        failing = f"{url}/manifest.json"
    else:
        url = server.url
        for shard in load_manifest(fine_dir).split("train"):
            server.fail(shard["file"], *["500"] * 4)
        failing = f"{url}/train-"
    proc = run_pretrain(tiny_overrides(tmp_path / "run", url, **{**STEPS, "data.fetch_retries": 1}))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(lines)
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    # the manifest and the shards both follow data.fetch_retries=1: two attempts each
    attempts = 2
    assert lines[0].startswith(f"error: fetching {failing}")
    assert f"failed after {attempts} attempts" in lines[0]
