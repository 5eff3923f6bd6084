"""Resume onto another layout, no offline step (issue 14): the steps after a resharded resume
equal the uninterrupted run within 1e-5 relative. Also the checkpoint CLI end to end from a
2-rank ZeRO-3 run: inspect, export (torch state dict, Hugging Face), import.

Two saved runs (module fixtures), each 8 steps with a tag at step 4, are resumed from step 4
at other layouts. ``model.vocab_multiple=40`` makes the vocabulary padding differ by tp
(520, 560, 640 rows at tp 1, 2, 4), so the padding is resharded too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, run_checkout, tiny_overrides
from tests.launching import assert_losses_equal, run_pretrain, step_losses

pytestmark = pytest.mark.slow

RUN = {
    "training.max_steps": 8,
    "training.save_interval": 4,
    "training.micro_batch": 1,
    "training.sample_tokens": 0,
    "model.vocab_multiple": 40,
}
TAG = "step_00000004"


def _saved(shards_dir, run_dir: Path, launcher: str, nproc: int, **layout) -> Path:
    proc = run_pretrain(tiny_overrides(run_dir, shards_dir, **RUN, **layout), launcher, nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / TAG / "COMPLETE").is_file()
    return run_dir


@pytest.fixture(scope="module")
def saved_3d(shards_dir, tmp_path_factory) -> Path:
    """tp 2 x pp 2 x dp 2, ZeRO-1: 8 ranks."""
    layout = {"parallel.tp": 2, "parallel.pp": 2, "zero.stage": 1}
    return _saved(shards_dir, tmp_path_factory.mktemp("tp2pp2dp2"), "torchrun", 8, **layout)


@pytest.fixture(scope="module")
def saved_zero3(shards_dir, tmp_path_factory) -> Path:
    """dp 2, ZeRO-3: 2 ranks."""
    return _saved(shards_dir, tmp_path_factory.mktemp("zero3dp2"), "torchrun", 2, **{"zero.stage": 3})


def _resume(saved: Path, shards_dir, run_dir: Path, nproc: int, **layout) -> None:
    over = tiny_overrides(
        run_dir, shards_dir, **RUN, **layout, **{"training.resume": saved / "checkpoints" / TAG}
    )
    proc = run_pretrain(over, "python" if nproc == 1 else "torchrun", nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {saved / 'checkpoints' / TAG} at step 4" in proc.stdout
    assert sorted(step_losses(run_dir)) == [5, 6, 7, 8]
    assert_losses_equal(step_losses(saved), step_losses(run_dir), range(5, 9))


@pytest.mark.parametrize(
    ("name", "nproc", "layout"),
    [
        ("tp1-pp1-dp1-zero0", 1, {"zero.stage": 0}),
        ("tp4-dp1-zero2", 4, {"parallel.tp": 4, "zero.stage": 2}),
        ("dp4-zero3", 4, {"zero.stage": 3}),
    ],
)
def test_tp2_pp2_dp2_zero1_checkpoint_resumes_at(saved_3d, shards_dir, tmp_path, name, nproc, layout):
    _resume(saved_3d, shards_dir, tmp_path, nproc, **layout)


@pytest.mark.parametrize(
    ("name", "layout"),
    [("tp2-zero1", {"parallel.tp": 2, "zero.stage": 1}), ("pp2-zero1", {"parallel.pp": 2, "zero.stage": 1})],
)
def test_zero3_dp2_checkpoint_resumes_at(saved_zero3, shards_dir, tmp_path, name, layout):
    _resume(saved_zero3, shards_dir, tmp_path, 2, **layout)


def _cli(*args: object) -> subprocess.CompletedProcess:
    return run_checkout([PYTHON, "-m", "megalm.checkpoint", *map(str, args)], 300)


def _batch_loss(saved: Path, logits_fn, fresh: bool = False) -> float:
    """Mean loss of ``logits_fn`` on the global batch of step 5 of run ``saved`` (the run's step-5
    loss is the step-4 weights on it), or on the first batch of the data (``fresh``)."""
    from megalm.config import load_config
    from megalm.data import load_manifest, open_train_batches

    cfg = load_config(saved / "config.yaml")
    meta = json.loads((saved / "checkpoints" / TAG / "meta.json").read_text())
    t = cfg.training
    batches = open_train_batches(
        cfg.data, load_manifest(cfg.data.dir), cfg.model.seq_len, t.global_batch, 1, 0, 1
    )
    if not fresh:
        batches.load_state_dict(meta["data"])
    losses = []
    with torch.no_grad():
        for x, y in batches.step_batches():
            logits = logits_fn(x)[..., : cfg.model.vocab_size]
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()))
    return torch.stack(losses).mean().item()


def test_inspect_names_layout_step_sizes_verification_and_config_diff(saved_zero3):
    proc = _cli("inspect", saved_zero3, "--config", ROOT / "configs" / "tiny.yaml", "zero.stage=3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    print(out)
    assert f"checkpoint  {saved_zero3 / 'checkpoints' / 'step_00000008'}" in out
    assert "step        8 (tokens seen 4,096; AdamW step 8)" in out
    assert "layout      tp=1 pp=1 dp=2 zero=3 (2 ranks; loads onto any layout)" in out
    assert "verified    yes: every file matches manifest.json" in out
    assert "model.d_model: 64 -> 192" in out and "zero.stage" not in out
    tag = saved_zero3 / "checkpoints" / TAG
    proc = _cli("inspect", tag)
    assert proc.returncode == 0 and "step        4 " in proc.stdout


def test_export_torch_state_dict_from_zero3_replaces_zero_to_fp32(saved_zero3, tmp_path):
    """The exported fp32 state dict loads into an unsharded GPT whose loss on the next batch is
    the one the run logged: the weights of every ZeRO-3 partition are there, exactly."""
    from megalm.config import load_config
    from megalm.model import GPT

    proc = _cli(
        "export", "--checkpoint", saved_zero3 / "checkpoints" / TAG, "--out", tmp_path, "--format", "torch"
    )
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(saved_zero3 / "config.yaml")
    model = GPT(cfg.model, init_seed=0)
    model.load_state_dict(torch.load(tmp_path / "pytorch_model.bin", weights_only=True))
    model.eval()
    mine, logged = _batch_loss(saved_zero3, model), step_losses(saved_zero3)[5]
    print(f"exported GPT loss {mine:.7f} vs logged {logged:.7f}")
    assert abs(mine - logged) / logged < 1e-5


def test_export_hf_and_import_from_a_zero3_run(saved_zero3, shards_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    proc = _cli("export", "--checkpoint", saved_zero3 / "checkpoints" / TAG, "--out", tmp_path / "hf4")
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf4", dtype=torch.float32).eval()
    mine, logged = _batch_loss(saved_zero3, lambda x: hf4(x).logits), step_losses(saved_zero3)[5]
    print(f"exported HF loss {mine:.7f} vs logged {logged:.7f}")
    assert abs(mine - logged) / logged < 1e-5
    # import -> a tag training resumes from: step 0, same weights, then 2 steps of continued pretraining
    proc = _cli("import", "--hf", tmp_path / "hf4", "--out", tmp_path / "cont")
    assert proc.returncode == 0, proc.stderr
    assert "continue pretraining with: model.family=llama" in proc.stdout
    over = tiny_overrides(tmp_path / "cont", shards_dir, **{**RUN, "training.max_steps": 2})
    cont = run_pretrain(over)
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert f"resumed from {tmp_path / 'cont' / 'checkpoints' / 'step_00000000'} at step 0" in cont.stdout
    first, want = (
        step_losses(tmp_path / "cont")[1],
        _batch_loss(saved_zero3, lambda x: hf4(x).logits, fresh=True),
    )
    print(
        f"continued pretraining from the import: step-1 loss {first:.7f}, HF model on that batch {want:.7f}"
    )
    assert abs(first - want) / want < 1e-5  # the imported weights, on the first batch of the data
