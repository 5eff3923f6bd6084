"""The loader's must-holds: every token once per epoch, exact resume (also at another dp size),
blending proportions, bad shards, and no hang with fewer shards than ranks x workers."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.preprocess import ShardWriter
from megalm.data import (
    BlendSchedule,
    DataError,
    PackedWindows,
    ShardDocuments,
    TrainBatches,
    load_manifest,
    open_split,
)
from megalm.data.shards import BadData

T, N_WINDOWS, EOS = 32, 96, 0


def write_shards(out: Path, docs: list[np.ndarray], n_shards: int, eos_id: int = EOS) -> Path:
    """Shards + manifest for token-id documents, through the preprocessing writer."""
    import io

    out.mkdir(parents=True, exist_ok=True)
    per = -(-sum(len(d) for d in docs) // n_shards)
    writer = ShardWriter(out, "train", per)
    for d in docs:
        buf = io.BytesIO()
        np.save(buf, d.astype(np.uint16), allow_pickle=False)
        writer.write(buf.getvalue(), len(d))
    writer.close()
    manifest = {
        "version": 2,
        "dtype": "uint16",
        "shards": writer.shards,
        "tokenizer": {"file": "tokenizer.json", "vocab_size": 65536, "eos_id": eos_id},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def unique_docs(seed: int = 0, first: int = 1) -> list[np.ndarray]:
    """Documents of distinct token ids whose EOS-separated stream is exactly N_WINDOWS*T + 1 long."""
    rng = np.random.default_rng(seed)
    total = N_WINDOWS * T + 1
    cuts = np.sort(rng.choice(np.arange(1, total), size=40, replace=False))
    cuts = cuts[np.diff(np.r_[0, cuts]) > 1]
    lengths = np.diff(np.r_[0, cuts, total]) - 1  # each document is followed by one EOS
    tokens = np.arange(first, first + lengths.sum())
    return np.split(tokens, np.cumsum(lengths)[:-1])


@pytest.fixture(scope="module")
def unique_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("unique"), unique_docs(), n_shards=5)


def loaders(windows, dp: int, micro: int, global_batch: int = 16, **kw) -> list[TrainBatches]:
    return [TrainBatches(windows, 7, global_batch, micro, r, dp, **kw) for r in range(dp)]


def step_rows(ranks: list[TrainBatches]) -> list[tuple[int, ...]]:
    """All input rows of the next optimizer step over every rank, sorted."""
    return sorted(tuple(row) for r in ranks for x, *_ in r.step_batches() for row in x.tolist())


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_one_epoch_puts_every_token_in_exactly_one_window(unique_dir, dp, workers):
    windows = open_split(load_manifest(unique_dir), "train", T)
    assert len(windows) == N_WINDOWS and len(windows.docs.files) == 5
    ranks = loaders(windows, dp, micro=2, workers=workers)
    seen = np.concatenate([np.array(step_rows(ranks)).ravel() for _ in range(N_WINDOWS // 16)])
    tokens = seen[seen != EOS]
    docs = unique_docs()
    expected = np.concatenate(docs)  # the stream's last token, the final EOS, is only ever a label
    assert len(tokens) == len(np.unique(tokens)) == len(expected)  # no duplicates ...
    assert np.array_equal(np.sort(tokens), expected)  # ... and no gaps
    assert (seen == EOS).sum() == len(docs) - 1
    assert all(r.epoch == 1.0 for r in ranks)


@pytest.mark.parametrize(("workers", "prefetch"), [(0, False), (2, False), (0, True), (2, True)])
def test_resume_gives_the_same_batches_twice_and_across_epochs(unique_dir, workers, prefetch):
    """Also with the next step built in the background (``prefetch``): the same batches as
    the plain loader, and the saved position is that of the steps handed out."""
    windows = open_split(load_manifest(unique_dir), "train", T)
    straight = TrainBatches(windows, 3, 24, 4, 0, 1)
    reference = [straight.step_batches() for _ in range(10)]  # 240 samples: 2.5 epochs
    run = TrainBatches(windows, 3, 24, 4, 0, 1, workers=workers, prefetch=prefetch)
    got = [run.step_batches() for _ in range(3)]
    for stop in (6, 10):  # resume at step 3 (mid-epoch) then at step 6 (past the first epoch boundary)
        state = json.loads(json.dumps(run.state_dict()))  # checkpoints store it as JSON
        assert state["consumed"] == 24 * len(got)
        run = TrainBatches(windows, 3, 24, 4, 0, 1, workers=workers, prefetch=prefetch)
        run.load_state_dict(state)
        got += [run.step_batches() for _ in range(stop - len(got))]
    for a, b in zip(reference, got, strict=True):
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert run.epoch == 240 / N_WINDOWS


def test_state_is_exact_although_workers_prefetched_ahead(unique_dir):
    windows = open_split(load_manifest(unique_dir), "train", T)
    run = TrainBatches(windows, 3, 8, 2, 0, 1, workers=2)
    run.step_batches()
    assert run.state_dict()["consumed"] == 8  # workers have built more than one step by now
    other = TrainBatches(windows, 3, 8, 2, 0, 1)
    other.load_state_dict(run.state_dict())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run.step_batches(), other.step_batches(), strict=True))


@pytest.mark.parametrize("new_dp", [1, 4])
def test_save_at_dp2_resume_at_other_dp_continues_the_same_order(unique_dir, new_dp):
    windows = open_split(load_manifest(unique_dir), "train", T)
    straight = loaders(windows, 1, 16)
    reference = [step_rows(straight) for _ in range(8)]
    two = loaders(windows, 2, 4)
    got = [step_rows(two) for _ in range(3)]
    resumed = loaders(windows, new_dp, 2)
    for r in resumed:
        r.load_state_dict(two[0].state_dict())
    got += [step_rows(resumed) for _ in range(5)]
    assert got == reference


def test_blend_proportions_are_exact_and_each_dataset_has_its_own_epochs():
    sched = BlendSchedule([5, 3, 2])
    which, _, counts = sched.assign(0, [0, 0, 0], 1000)
    prefix = np.stack([np.cumsum(which == k) for k in range(3)], axis=1)
    ideal = np.arange(1, 1001)[:, None] * np.array(sched.weights)
    assert np.abs(prefix - ideal).max() < 1  # every prefix within +-1
    for n in (10, 37, 100):  # any window of n samples: within +-2 (+-1 for windows starting at 0)
        counts_n = np.stack([np.convolve(which == k, np.ones(n), "valid") for k in range(3)], axis=1)
        assert np.abs(counts_n - n * np.array(sched.weights)).max() < 2
    # Resuming the schedule from its counts continues it exactly.
    w2, _, c2 = sched.assign(600, list(prefix[599]), 400)
    assert np.array_equal(w2, which[600:]) and c2 == counts
    # Three datasets with distinct token ranges: per step the mix follows the weights; the small
    # one wraps into its second epoch while the others do not.
    sizes = [40, 200, 400]
    sources = [
        PackedWindows([np.arange(10000 * (k + 1), 10000 * (k + 1) + s * 8)], 8, EOS)
        for k, s in enumerate(sizes)
    ]
    ranks = loaders(sources, 2, 5, global_batch=20, weights=[0.5, 0.3, 0.2])
    for _ in range(5):
        rows = np.array(step_rows(ranks))
        per = [int((rows[:, 0] // 10000 == k + 1).sum()) for k in range(3)]
        assert per == [10, 6, 4]
    assert ranks[0].counts == [50, 30, 20]
    assert ranks[0].epoch == 50 / 40


def corrupt(src: Path, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    victim = load_manifest(dst).split("train")[2]["file"]
    data = bytearray((dst / victim).read_bytes())
    if how == "truncated":
        (dst / victim).write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        data[-2000] ^= 0xFF
        (dst / victim).write_bytes(bytes(data))
    else:
        (dst / victim).unlink()
    return victim


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "fails its sha256 check"),
        ("flipped", "fails its sha256 check"),
        ("missing", "is listed in .* but missing"),
    ],
)
def test_bad_shard_raises_naming_it_or_is_skipped_counted_and_remembered(unique_dir, tmp_path, how, message):
    victim = corrupt(unique_dir, tmp_path / "bad", how)
    m = load_manifest(tmp_path / "bad")
    with pytest.raises(DataError, match=f"{victim}' {message}"):
        open_split(m, "train", T)
    if how == "truncated":
        with pytest.raises(DataError, match=f"{victim}' cannot be read"):
            open_split(m, "train", T, verify=False)
    skipped = open_split(m, "train", T, on_bad_data="skip")
    assert skipped.docs.bad.skipped == {"shards": [victim], "documents": []}
    assert 0 < len(skipped) < N_WINDOWS
    run = TrainBatches(skipped, 1, 8, 2, 0, 1)
    run.step_batches()
    state = run.state_dict()
    assert state["skipped"] == [{"shards": [victim], "documents": []}]
    # The shard is restored: a resumed run still leaves it out, so the order is unchanged.
    healthy = TrainBatches(
        open_split(load_manifest(unique_dir), "train", T, on_bad_data="skip"), 1, 8, 2, 0, 1
    )
    healthy.load_state_dict(state)
    assert torch.equal(healthy.step_batches()[0][0], run.step_batches()[0][0])


def test_undecodable_sample_without_index_raises_or_is_skipped(unique_dir, tmp_path):
    shutil.copytree(unique_dir, tmp_path / "d")
    m = load_manifest(tmp_path / "d")
    victim = tmp_path / "d" / m.split("train")[0]["file"]
    (victim.parent / (victim.name + ".index.npy")).unlink()  # force the scan path
    with tarfile.open(victim) as tf:
        start = next(iter(tf)).offset_data
    data = bytearray(victim.read_bytes())
    data[start + 1 : start + 6] = b"XXXXX"  # the first member's npy magic
    victim.write_bytes(bytes(data))
    key = "train-00000-000000000.ids.npy"
    with pytest.raises(DataError, match=f"document '{key}' of shard .* fails to decode"):
        ShardDocuments(m, "train", verify=False)
    docs = ShardDocuments(m, "train", BadData("skip"), verify=False)
    assert docs.bad.skipped["documents"] == [f"{victim.name}#{key}"]
    assert len(docs) == sum(s["documents"] for s in m.split("train")) - 1


@pytest.mark.slow
def test_fewer_shards_than_ranks_times_workers_does_not_hang(tmp_path):
    one = write_shards(tmp_path / "one", unique_docs(), n_shards=1)
    windows = open_split(load_manifest(one), "train", T)
    assert len(windows.docs.files) == 1
    ranks = loaders(windows, 4, 2, global_batch=16, workers=2)  # 8 readers, 1 shard
    per_rank = [[r.step_batches() for _ in range(7)] for r in ranks]  # 7 steps > 1 epoch
    assert {len(p) for p in per_rank} == {7} and all(len(s) == 2 for p in per_rank for s in p)
    rows = sorted(tuple(row) for p in per_rank for s in p[:6] for x, _ in s for row in x.tolist())
    assert len(set(rows)) == len(rows) == N_WINDOWS


def test_position_and_doc_ids_restart_at_every_document_boundary():
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10, 11, 12, 13]), np.array([14])]
    w = PackedWindows(docs, seq_len=6, eos_id=EOS)  # stream: 5 6 7 E 8 E 9 10 11 12 13 E 14 E
    tokens, pos, doc = w.window(0, with_ids=True)
    assert tokens.tolist() == [5, 6, 7, EOS, 8, EOS, 9]
    assert doc.tolist() == [0, 0, 0, 0, 1, 1] and pos.tolist() == [0, 1, 2, 3, 0, 1]
    x, y, p, d = w.batch(np.array([0, 1]), with_ids=True)
    assert x[1].tolist() == [9, 10, 11, 12, 13, EOS] and p[1].tolist() == list(range(6))
    assert d[1].tolist() == [0] * 6 and torch.equal(x[:, 1:], y[:, :-1])
    run = TrainBatches(w, 0, 2, 1, 0, 1, with_ids=True)
    assert all(len(mb) == 4 and mb[0].shape == mb[3].shape == (1, 6) for mb in run.step_batches())


def test_blend_config_builds_one_loader_over_several_directories(unique_dir, tmp_path):
    from megalm.config.schema import DataConfig
    from megalm.data import open_train_batches

    other = write_shards(tmp_path / "other", unique_docs(seed=1, first=40000), n_shards=2)
    cfg = DataConfig(dir=str(unique_dir), blend=f"3:{unique_dir},1:{other}", workers=0)
    run = open_train_batches(cfg, load_manifest(unique_dir), T, 16, 4, 0, 1)
    rows = np.array([r for _ in range(4) for x, _ in run.step_batches() for r in x.tolist()])
    assert int((rows.max(axis=1) >= 40000).sum()) == 16 and len(rows) == 64
    with pytest.raises(DataError, match="data.blend entry 'x' is not weight:path"):
        open_train_batches(
            DataConfig(dir=str(unique_dir), blend="x"), load_manifest(unique_dir), T, 16, 4, 0, 1
        )
