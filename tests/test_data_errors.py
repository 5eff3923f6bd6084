"""Bad data found by hostile-user testing: each is one DataError / InputError sentence, raised by the
data-opening functions (before the trainer builds any process group), printed as one ``error:`` line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_tools.megatron import MegatronWriter, import_megatron
from data_tools.preprocess import preprocess
from data_tools.train_tokenizer import EOS, load_tokenizer, train_tokenizer
from megalm.config.schema import DataConfig
from megalm.data import DataError, load_manifest, open_train_batches
from tests.conftest import PYTHON, run_checkout, tiny_overrides
from tests.launching import run_pretrain


@pytest.fixture(scope="module")
def small(corpus_dir, tmp_path_factory) -> Path:
    """Thirty stdlib documents as one .jsonl."""
    lines = (corpus_dir / "stdlib.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    path.write_text("\n".join(lines[:30]) + "\n")
    return path


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return run_checkout([PYTHON, "-m", *args], 300)


def test_only_invalid_utf8_input_is_one_sentence(tokenizer_path, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not text")
    proc = run_tool(
        "data_tools.preprocess", "--input", str(bad), "--tokenizer", str(tokenizer_path), "--output",
        str(tmp_path / "out"), "--workers", "1",
    )  # fmt: skip
    line = one_error_line(proc)
    print(line)
    assert line == (
        f"error: {bad}: not UTF-8 (byte 0: invalid start byte); fix the file or pass --on-bad-input skip"
    )
    assert not (tmp_path / "out").exists()


def test_blend_of_another_tokenizer_with_the_same_vocab_size_names_both(
    small, corpus_dir, tokenizer_path, shards_dir, tmp_path
):
    other_tok = train_tokenizer([str(small)], 512, tmp_path / "tok")  # same size, other merges
    other = tmp_path / "other"
    preprocess([str(small)], other_tok, other)
    assert load_manifest(other).vocab_size == load_manifest(shards_dir).vocab_size
    data = DataConfig(dir=str(shards_dir), blend=f"1:{shards_dir},1:{other}")
    with pytest.raises(DataError) as e:
        open_train_batches(data, load_manifest(shards_dir), 64, 8, 2, 0, 1)
    print(f"error: {e.value}")
    names_both = f"data.blend dataset '{other}' was built with another tokenizer than data.dir '{shards_dir}'"
    assert names_both in str(e.value)
    assert "tokenizer.json sha256" in str(e.value) and "vocab 512 vs 512" in str(e.value)


def test_seq_len_longer_than_all_the_data_says_so(small, tokenizer_path, tmp_path):
    preprocess([str(small)], tokenizer_path, tmp_path / "s")
    m = load_manifest(tmp_path / "s")
    total = sum(s["tokens"] + s["documents"] for s in m.shards)
    with pytest.raises(DataError) as e:
        open_train_batches(DataConfig(dir=str(tmp_path / "s")), m, total, 8, 2, 0, 1)
    print(f"error: {e.value}")
    assert str(e.value).startswith(
        f"model.seq_len ({total}) is longer than every training document of data.dir '{tmp_path / 's'}'"
    )
    assert f"one window needs seq_len + 1 = {total + 1}; lower model.seq_len or add data" in str(e.value)


def test_data_dir_that_is_a_file_names_it(shards_dir):
    with pytest.raises(DataError, match="is a file, not a directory; set data.dir to the directory"):
        load_manifest(shards_dir / "manifest.json")


def test_megatron_import_checks_its_input_before_writing_anything(tokenizer_path, tmp_path):
    w = MegatronWriter(tmp_path / "mt", np.dtype(np.uint16))
    for doc in ([1, 2, 3], [4, 5], [6]):
        w.add_document(np.array(doc))
    w.close()
    data = (tmp_path / "mt.bin").read_bytes()
    (tmp_path / "cut.idx").write_bytes((tmp_path / "mt.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes(data[:-2])
    (tmp_path / "junk.idx").write_bytes(b"NOTANIDX" * 8)
    cases = {
        "nowhere": f"'{tmp_path / 'nowhere.idx'}' does not exist; --input is the path prefix",
        "junk": "is not a Megatron MMIDIDX version-1 index",
        "cut": f"'{tmp_path / 'cut.bin'}' holds {len(data) - 2} bytes, its index points up to {len(data)}",
    }
    for prefix, message in cases.items():
        out = tmp_path / f"out-{prefix}"
        line = one_error_line(
            run_tool("data_tools.megatron", "import", "--input", str(tmp_path / prefix), "--tokenizer",
                     str(tokenizer_path), "--output", str(out))
        )  # fmt: skip
        print(line)
        assert message in line
        assert not out.exists() and not list(tmp_path.glob(f".out-{prefix}*"))  # nothing left behind


def test_megatron_import_drops_and_counts_empty_documents(tokenizer_path, tmp_path):
    eos = load_tokenizer(tokenizer_path).token_to_id(EOS)
    w = MegatronWriter(tmp_path / "mt", np.dtype(np.uint16))
    for doc in ([1, 2, 3, eos], [], [eos], [4, 5]):
        w.add_document(np.array(doc, dtype=np.uint16))
    w.close()
    m = import_megatron(str(tmp_path / "mt"), tokenizer_path, tmp_path / "out")
    assert m["skipped"] == {"empty": 2}
    assert sum(s["documents"] for s in m["shards"]) == 2 and sum(s["tokens"] for s in m["shards"]) == 5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["file", "seq_len"])
def test_the_trainer_prints_data_errors_as_one_line(shards_dir, tmp_path, case):
    if case == "file":
        overrides = tiny_overrides(tmp_path, shards_dir / "manifest.json")
        expected = "is a file, not a directory"
    else:
        overrides = tiny_overrides(tmp_path, shards_dir, **{"model.seq_len": 10_000_000})
        expected = "model.seq_len (10000000) is longer than every training document"
    line = one_error_line(run_pretrain(overrides))
    print(line)
    assert expected in line
