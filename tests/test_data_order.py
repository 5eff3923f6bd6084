"""The data order of the golden runs, pinned: which windows, which token ids, in which order.

A change in the sampler's permutation, the packing, the tokenizer or the rank slicing
moves these numbers first, and the failure says so before any loss does.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from megalm.config import load_config
from megalm.data import GlobalOrderSampler, load_manifest, open_train_batches
from tests.conftest import ROOT

SEQ, GLOBAL, MICRO = 64, 8, 2  # the golden config's shapes
TRAIN_WINDOWS = 1669
FIRST_WINDOWS = [1085, 1426, 484, 1180, 518, 1345, 940, 540]  # epoch 0 of data.seed 1234
FIRST_ROW = [13, 316, 222, 48, 83, 417, 15, 200, 42, 500, 263, 390, 282, 258, 83, 393]
FIRST_ROW_TEXT = ", said Orrin.\nIvo the carter trad"
FIRST_BATCH_SHA256 = "1c99c88e40f6c1a572792e6b50166a0a3ed6bae8fa0d433f91e847ac799c336d"  # int64 LE, (8, 64)


def _batches(data_dir, dp_rank: int = 0, dp: int = 1, micro: int = MICRO):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.dir={data_dir}"])
    return open_train_batches(cfg.data, load_manifest(data_dir), SEQ, GLOBAL, micro, dp_rank, dp)


def _first_global_batch(data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    micro_batches = _batches(data_dir).step_batches()
    return torch.cat([x for x, _ in micro_batches]), torch.cat([y for _, y in micro_batches])


def test_first_global_batch_is_pinned(golden_data):
    batches = _batches(golden_data)
    assert batches.seed == 1234 and len(batches.sources[0]) == TRAIN_WINDOWS
    assert GlobalOrderSampler(TRAIN_WINDOWS, 1234).indices(0, GLOBAL).tolist() == FIRST_WINDOWS
    x, y = _first_global_batch(golden_data)
    assert x.shape == y.shape == (GLOBAL, SEQ) and x.dtype == torch.int64
    assert x[0, :16].tolist() == FIRST_ROW
    assert hashlib.sha256(x.numpy().astype("<i8").tobytes()).hexdigest() == FIRST_BATCH_SHA256
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next tokens
    windows = batches.sources[0]
    for row, w in enumerate(FIRST_WINDOWS):  # row j of the global batch is window FIRST_WINDOWS[j]
        assert np.array_equal(x[row].numpy(), windows.window(w)[:-1])


def test_first_row_decodes_to_the_corpus_text(golden_data):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(golden_data / "tokenizer.json"))
    assert tok.decode(FIRST_ROW) == FIRST_ROW_TEXT
    assert FIRST_ROW_TEXT in (ROOT / "tests" / "data" / "corpus.jsonl").read_text().replace("\\n", "\n")


def test_every_layout_reads_the_pinned_rows_in_place(golden_data):
    """Rank r's micro-batch j holds rows ``j*m*dp + r*m + [0, m)`` of the global batch."""
    x, _ = _first_global_batch(golden_data)
    for dp, micro in [(2, 2), (2, 4), (4, 1), (8, 1)]:
        for rank in range(dp):
            got = [xb for xb, _ in _batches(golden_data, rank, dp, micro).step_batches()]
            for j, xb in enumerate(got):
                start = j * micro * dp + rank * micro
                assert torch.equal(xb, x[start : start + micro]), (dp, micro, rank, j)
