"""The checkpoint format without training: pieces and boxes, vocabulary padding, manifest,
publishing order, pipeline names, model-shape errors. (Engines and real runs:
``test_checkpoint_resume.py``, ``test_checkpoint_reshard.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalm.checkpoint.manifest import COMPLETE, MANIFEST, CheckpointError, verify_tag
from megalm.checkpoint.tensors import (
    MODEL,
    TensorIndex,
    full_box,
    load_full_state_dict,
    pieces_bytes,
    shard_file,
)
from megalm.checkpoint.writer import complete_tags, publish, write_rank_files
from megalm.config import Config, ModelConfig
from megalm.train.engine_state import global_name
from megalm.train.model_shape import shape_problem


def _write_tp_pieces(tag: Path, full: torch.Tensor, tp: int, dim: int, vocab_dim: int | None) -> None:
    """Save ``full`` split over ``tp`` ranks along ``dim``, one file per rank, as a run would."""
    files = {}
    for r, part in enumerate(full.chunk(tp, dim)):
        box = list(full_box(tuple(full.shape)))
        n = part.shape[dim]
        box[dim] = (r * n, (r + 1) * n)
        pieces = {"w": (part, tuple(box), tuple(full.shape), vocab_dim)}
        files[shard_file(MODEL, r, 0, 0)] = lambda p=pieces: pieces_bytes(p)
    write_rank_files(tag, 0, files)
    publish(tag, 1, keep=0, timeout_s=10)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("saved_tp,loaded_tp", [(2, 1), (2, 4), (4, 2), (1, 4)])
def test_any_tp_shard_reads_back_from_pieces_saved_at_another_tp(tmp_path, dim, saved_tp, loaded_tp):
    full = torch.randn(8, 12)
    _write_tp_pieces(tmp_path / "step_00000001", full, saved_tp, dim, None)
    index = TensorIndex(tmp_path / "step_00000001", MODEL)
    for r, want in enumerate(full.chunk(loaded_tp, dim)):
        box = list(full_box((8, 12)))
        n = want.shape[dim]
        box[dim] = (r * n, (r + 1) * n)
        assert torch.equal(index.read("w", tuple(box)), want)
    assert torch.equal(load_full_state_dict(tmp_path / "step_00000001")["w"], full)


def test_vocabulary_padding_grows_with_zeros_and_shrinks_by_slicing(tmp_path):
    """Saved at tp=2 with 10 rows (8 real + 2 padding); read at 12 and at 8 rows."""
    full = torch.randn(10, 4)
    _write_tp_pieces(tmp_path / "t", full, 2, 0, vocab_dim=0)
    index = TensorIndex(tmp_path / "t", MODEL)
    grown = index.read("w", ((6, 12), (0, 4)))  # tp=2 rank 1 of a 12-row padding
    assert torch.equal(grown[:4], full[6:10]) and torch.equal(grown[4:], torch.zeros(2, 4))
    assert torch.equal(index.read("w", ((0, 8), (0, 4))), full[:8])
    assert index.vocab_dims["w"] == 0


def test_a_missing_piece_is_an_error_not_zeros(tmp_path):
    full = torch.randn(8, 4)
    _write_tp_pieces(tmp_path / "t", full, 2, 0, None)
    (tmp_path / "t" / shard_file(MODEL, 1, 0, 0)).unlink()
    index = TensorIndex(tmp_path / "t", MODEL)
    with pytest.raises(CheckpointError, match="tensor 'w' is incomplete"):
        index.read("w", ((0, 8), (0, 4)))


def _tag_with_two_files(tag: Path) -> None:
    write_rank_files(tag, 0, {"a.bin": lambda: b"x" * 100})
    write_rank_files(tag, 1, {"rng/rank_00001.pt": lambda: b"y" * 50})


def test_manifest_names_the_truncated_corrupted_or_missing_file(tmp_path):
    tag = tmp_path / "step_00000002"
    _tag_with_two_files(tag)
    publish(tag, 2, keep=0, timeout_s=10)
    assert set(json.loads((tag / MANIFEST).read_text())["files"]) == {"a.bin", "rng/rank_00001.pt"}
    assert verify_tag(tag) is None
    data = bytearray((tag / "a.bin").read_bytes())
    data[7] ^= 0x01
    (tag / "a.bin").write_bytes(bytes(data))
    assert verify_tag(tag) == f"'{tag / 'a.bin'}' is corrupted (sha256 differs from the manifest)"
    (tag / "rng" / "rank_00001.pt").write_bytes(b"y" * 20)
    assert verify_tag(tag, rank=1, world_size=2) == (
        f"'{tag / 'rng' / 'rank_00001.pt'}' is truncated or overwritten (20 bytes, the manifest says 50)"
    )
    (tag / "a.bin").unlink()
    assert verify_tag(tag, rank=0, world_size=2) == f"'{tag / 'a.bin'}' is missing"
    (tag / MANIFEST).write_text("{not json")
    assert "manifest.json' is unreadable" in verify_tag(tag)


def test_a_tag_is_published_only_when_every_rank_is_done_and_pruned_only_after(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        _tag_with_two_files(ckpt / f"step_{step:08d}")
        publish(ckpt / f"step_{step:08d}", 2, keep=2, timeout_s=10)
    tag = ckpt / "step_00000003"
    write_rank_files(tag, 0, {"a.bin": lambda: b"z"})  # rank 1 never finishes (killed)
    with pytest.raises(CheckpointError, match=r"ranks \[1\] did not finish writing within 0s"):
        publish(tag, 2, keep=2, timeout_s=0.05)
    assert not (tag / COMPLETE).exists() and not (tag / MANIFEST).exists()
    assert (ckpt / "latest").read_text().strip() == "step_00000002"
    assert complete_tags(ckpt) == ["step_00000001", "step_00000002"]  # nothing pruned
    write_rank_files(tag, 1, {"b.bin": lambda: b"w"})
    publish(tag, 2, keep=2, timeout_s=10)
    assert complete_tags(ckpt) == ["step_00000002", "step_00000003"]
    assert (ckpt / "latest").read_text().strip() == "step_00000003"


def test_pipeline_layer_names_map_to_gpt_names():
    L = 4
    assert global_name("tied_modules.embed.tok_emb.weight", L, True) == "embed.tok_emb.weight"
    assert global_name("0.tok_emb.weight", L, True) == "embed.tok_emb.weight"
    assert global_name("1.attn.wq.weight", L, True) == "blocks.0.attn.wq.weight"
    assert global_name("4.mlp.w2.weight", L, True) == "blocks.3.mlp.w2.weight"
    assert global_name("5.norm.weight", L, True) == "final_norm.norm.weight"
    assert global_name("6.proj.weight", L, True) == "head.proj.weight"
    assert global_name("blocks.0.attn.wq.weight", L, False) == "blocks.0.attn.wq.weight"


def _save_model(tag: Path, model: ModelConfig) -> dict:
    from megalm.model import GPT
    from megalm.train.engine_state import local_params

    gpt = GPT(model, init_seed=0)
    pieces = {
        lp.name: (lp.param.data, lp.box, lp.shape, lp.vocab_dim)
        for lp in local_params(gpt, 0, model.n_layers, False)
    }
    write_rank_files(tag, 0, {shard_file(MODEL, 0, 0, 0): lambda: pieces_bytes(pieces)})
    return {"config": {"model": vars(model)}}


def test_another_model_shape_names_the_tensors_and_keys_that_differ(tmp_path):
    saved = ModelConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=4, seq_len=16)
    meta = _save_model(tmp_path, saved)
    index = TensorIndex(tmp_path, MODEL)
    same = Config(
        model=ModelConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_multiple=7)
    )
    assert shape_problem(tmp_path, meta, index, same) is None  # padding differs, the model does not
    other = Config(model=ModelConfig(vocab_size=100, n_layers=3, d_model=64, n_heads=4, seq_len=16))
    problem = shape_problem(tmp_path, meta, index, other)
    assert problem.startswith(
        f"checkpoint '{tmp_path}' holds another model than this run's: missing blocks.2."
    )
    assert "different shapes: blocks.0.attn.wk.weight (32, 32) saved vs (64, 64) here" in problem
    assert "it was saved with model.n_layers=2 (this run: 3), model.d_model=32 (this run: 64)" in problem
    assert problem.endswith("or start fresh with training.resume=never")
    fewer_vocab = Config(model=ModelConfig(vocab_size=90, n_layers=2, d_model=32, n_heads=4, seq_len=16))
    assert "embed.tok_emb.weight (100, 32) saved vs (90, 32) here" in shape_problem(
        tmp_path, meta, index, fewer_vocab
    )


def test_cli_resolves_a_run_dir_a_checkpoints_dir_its_latest_file_or_a_tag(tmp_path):
    from megalm.checkpoint.cli import resolve_tag

    ckpt = tmp_path / "checkpoints"
    _tag_with_two_files(ckpt / "step_00000002")
    publish(ckpt / "step_00000002", 2, keep=0, timeout_s=10)
    for path in (tmp_path, ckpt, ckpt / "latest", ckpt / "step_00000002"):
        assert resolve_tag(path) == ckpt / "step_00000002"
    with pytest.raises(CheckpointError, match="is not a megalm checkpoint"):
        resolve_tag(tmp_path / "nope")
