"""Corpus -> tokenizer -> shards -> packed windows -> per-rank batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_tools.inputs import InputError
from data_tools.preprocess import preprocess
from data_tools.train_tokenizer import EOS, load_tokenizer, train_tokenizer
from megalm.data import (
    DataError,
    GlobalOrderSampler,
    PackedWindows,
    TrainBatches,
    eval_batches,
    load_manifest,
    read_documents,
)
from tests.conftest import PYTHON, run_checkout


def test_tokenizer_round_trips_bytes_and_has_special_tokens(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(EOS) is not None
    assert tok.get_vocab_size() == 512


def test_manifest_counts_match_shards(shards_dir):
    m = load_manifest(shards_dir)
    assert len(m.split("train")) >= 3 and len(m.split("val")) >= 1
    docs = read_documents(m, "train")
    assert len(docs) == sum(s["documents"] for s in m.split("train"))
    assert sum(len(d) for d in docs) == sum(s["tokens"] for s in m.split("train"))
    assert all(d.dtype == np.uint16 for d in docs)


def test_preprocess_is_byte_identical_across_runs_and_worker_counts(corpus_dir, tokenizer_path, tmp_path):
    a = preprocess(
        [str(corpus_dir)], tokenizer_path, tmp_path / "a", workers=1, shard_tokens=150_000, val_fraction=0.1
    )
    b = preprocess(
        [str(corpus_dir)], tokenizer_path, tmp_path / "b", workers=2, shard_tokens=150_000, val_fraction=0.1
    )
    assert a == b
    for shard in a["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()


def test_every_token_lands_in_exactly_one_window(shards_dir):
    m = load_manifest(shards_dir)
    docs = read_documents(m, "train")
    w = PackedWindows(docs, seq_len=64, eos_id=m.eos_id)
    stream = np.concatenate([np.append(d, m.eos_id) for d in docs])
    inputs = np.concatenate([w.window(i)[:-1] for i in range(len(w))])
    assert np.array_equal(inputs, stream[: len(w) * 64])  # only the tail (< seq_len + 1) is dropped
    x, y = w.batch(np.array([0, 5]))
    assert x.shape == (2, 64) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


@pytest.mark.parametrize(("dp", "micro"), [(2, 2), (4, 1), (2, 1)])
def test_step_samples_do_not_depend_on_layout(shards_dir, dp, micro):
    m = load_manifest(shards_dir)
    w = PackedWindows(read_documents(m, "train"), 64, m.eos_id)
    single = TrainBatches(w, seed=3, global_batch=8, micro_batch=8, dp_rank=0, dp_size=1)
    ranks = [TrainBatches(w, 3, 8, micro, r, dp) for r in range(dp)]
    for _ in range(5):
        ((ref_x, _),) = single.step_batches()
        got = [x for r in ranks for x, _ in r.step_batches()]
        ref_rows = sorted(map(tuple, ref_x.tolist()))
        assert sorted(tuple(row) for x in got for row in x.tolist()) == ref_rows


def test_sampler_crosses_epochs_with_fresh_permutations():
    s = GlobalOrderSampler(10, seed=0)
    idx = s.indices(0, 30)
    for e in range(3):
        assert sorted(idx[10 * e : 10 * (e + 1)]) == list(range(10))
    assert list(idx[:10]) != list(idx[10:20])


def test_resume_state_continues_the_same_order_even_at_another_dp_size(shards_dir):
    m = load_manifest(shards_dir)
    w = PackedWindows(read_documents(m, "train"), 64, m.eos_id)
    straight = TrainBatches(w, 1, 8, 4, 0, 1)
    rows = [straight.step_batches() for _ in range(4)]
    first = TrainBatches(w, 1, 8, 4, 0, 1)
    first.step_batches(), first.step_batches()
    resumed = [TrainBatches(w, 1, 8, 2, r, 2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(first.state_dict())
    for step in (2, 3):
        ref = sorted(tuple(t) for x, _ in rows[step] for t in x.tolist())
        got = sorted(tuple(t) for r in resumed for x, _ in r.step_batches() for t in x.tolist())
        assert got == ref
    with pytest.raises(ValueError, match="resume with the same data.dir"):
        TrainBatches(w, 2, 8, 4, 0, 1).load_state_dict(first.state_dict())


def test_eval_batches_cover_the_same_windows_for_any_dp(shards_dir):
    m = load_manifest(shards_dir)
    w = PackedWindows(read_documents(m, "val"), 64, m.eos_id)
    one = {tuple(r) for x, _ in eval_batches(w, 8, 4, 0, 1) for r in x.tolist()}
    two = {tuple(r) for d in range(2) for x, _ in eval_batches(w, 8, 2, d, 2) for r in x.tolist()}
    assert one == two and len(one) == 8


def test_missing_and_corrupt_shards_name_the_file(shards_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards_dir, bad)
    victim = load_manifest(bad).split("train")[1]["file"]
    data = (bad / victim).read_bytes()
    (bad / victim).chmod(0o644)  # published shards are read-only
    (bad / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{victim}' fails its sha256 check"):
        read_documents(load_manifest(bad), "train")
    with pytest.raises(DataError, match=f"{victim}' cannot be read"):
        read_documents(load_manifest(bad), "train", verify=False)
    (bad / victim).unlink()
    with pytest.raises(DataError, match=f"{victim}' is listed in .* but missing"):
        read_documents(load_manifest(bad), "train")
    with pytest.raises(DataError, match="does not exist; build it with `make data`"):
        load_manifest(tmp_path / "nowhere")


def test_empty_corpus_is_an_error_in_every_tool(tmp_path, tokenizer_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n\n")
    with pytest.raises(InputError, match="hold no non-empty documents"):
        train_tokenizer([str(empty)], 512, tmp_path / "tok")
    with pytest.raises(InputError, match="hold no non-empty documents"):
        preprocess([str(empty)], tokenizer_path, tmp_path / "out")
    cmd = [PYTHON, "-m", "data_tools.preprocess", "--input", str(empty), "--tokenizer", str(tokenizer_path)]
    proc = run_checkout([*cmd, "--output", str(tmp_path / "out")], 300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: the inputs ['{empty}'] hold no non-empty documents (text key 'text'; skipped: 1 empty)"
    ]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing left behind


def test_jsonl_without_text_key_names_the_line(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"content": "hello"}\n')
    from data_tools.inputs import read_documents as read_inputs

    with pytest.raises(InputError, match="x.jsonl:1: no 'text' field; pass --text-key"):
        list(read_inputs([bad]))


def test_shards_are_plain_webdataset_and_the_index_matches_a_scan(shards_dir):
    import io

    import webdataset as wds

    from megalm.data import scan_shard

    m = load_manifest(shards_dir)
    shard = m.split("train")[0]
    path = shards_dir / shard["file"]
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()))
    docs = read_documents(m, "train")[: shard["documents"]]
    assert len(samples) == shard["documents"]
    assert all(
        np.array_equal(np.load(io.BytesIO(s["ids.npy"])), d) for s, d in zip(samples, docs, strict=True)
    )
    assert np.array_equal(np.load(path.with_name(path.name + ".index.npy")), scan_shard(path))
