"""launch/evaluate.py and launch/generate.py on a trained tiny run (packed documents masked),
under one process and tensor parallelism; the pipeline-parallel run with document masking
equals the single process and samples text through the stages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megalm.checkpoint.tensors import load_full_state_dict, resize_rows
from megalm.config import ModelConfig
from megalm.data import load_manifest
from megalm.model import GPT, Sampling, decoding, generate
from megalm.train.checkpoint import read_meta
from megalm.train.eval_checkpoint import split_overrides, text_windows, token_bytes
from megalm.train.metrics import read_metrics
from megalm.train.model_shape import expected_tensors
from tests.conftest import tiny_overrides
from tests.launching import assert_losses_equal, run_pretrain, run_script, step_losses

PROMPTS = ["def ", "import os\nclass "]


@pytest.fixture(scope="module")
def doc_run(shards_dir, tmp_path_factory) -> tuple[Path, str]:
    """10 steps, one process, data.document_mask=true; held-out loss at steps 0 and 10, a checkpoint at 10."""
    run_dir = tmp_path_factory.mktemp("docmask")
    proc = run_pretrain(
        tiny_overrides(run_dir, shards_dir, **{"training.max_steps": 10, "data.document_mask": True})
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def _last_val_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r][-1]["val_loss"]


def _evaluation(run_dir: Path, out: Path, *args: str, launcher: str = "python", nproc: int = 1) -> dict:
    proc = run_script(
        "evaluate.py", ["--checkpoint", str(run_dir / "checkpoints" / "latest"), "--json", str(out), *args],
        launcher, nproc,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits per byte" in proc.stdout and "perplexity" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_evaluate_reproduces_the_logged_val_loss_in_one_process(doc_run, tmp_path):
    run_dir, _ = doc_run
    result = _evaluation(run_dir, tmp_path / "eval.json")
    diff = abs(result["loss"] - _last_val_loss(run_dir))
    print(f"evaluate (1 process) - val_loss: {diff:.2e}")
    assert diff <= 1e-5
    assert result["step"] == 10 and result["windows"] == 8 and result["tokens"] == 8 * 64
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(
        result["tokens"] * result["loss"] / (math.log(2) * result["bytes"])
    )


@pytest.mark.slow
def test_evaluate_under_tp2_reproduces_the_logged_val_loss(doc_run, shards_dir, tmp_path):
    """torchrun, 2 ranks, tp 2, the shard directory named explicitly (its first 8 held-out windows
    are the trainer's): the layout-free checkpoint loads onto tp 2."""
    run_dir, _ = doc_run
    args = ["--data", str(shards_dir), "--windows", "8", "parallel.tp=2"]
    result = _evaluation(run_dir, tmp_path / "eval.json", *args, launcher="torchrun", nproc=2)
    diff = abs(result["loss"] - _last_val_loss(run_dir))
    print(f"evaluate (tp 2) - val_loss: {diff:.2e}")
    assert result["layout"]["tp"] == 2 and result["windows"] == 8
    assert diff <= 1e-5


def _reference_continuations(run_dir: Path, shards_dir: Path, n: int) -> list[str]:
    """No-cache greedy loop on the unsharded model with the checkpoint's weights, in this process."""
    from tokenizers import Tokenizer

    tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    cfg = ModelConfig(**read_meta(tag)["config"]["model"])
    state = load_full_state_dict(tag)
    for name, (shape, vdim) in expected_tensors(cfg).items():
        if vdim is not None:
            state[name] = resize_rows(state[name], shape[vdim])
    model = GPT(cfg, init_seed=0)
    model.load_state_dict(state)
    manifest = load_manifest(shards_dir)
    tok = Tokenizer.from_file(str(manifest.tokenizer_file))
    with decoding(model):
        rows = generate(
            model, [tok.encode(p).ids for p in PROMPTS], n, cfg.seq_len, Sampling(0), None, manifest.eos_id,
            use_cache=False,
        )  # fmt: skip
    return [p + tok.decode(r) for p, r in zip(PROMPTS, rows, strict=True)]


@pytest.mark.slow
def test_generate_cli_under_tp2_equals_the_no_cache_loop(doc_run, shards_dir):
    """launch/generate.py, torchrun 2 ranks, tp 2 (+ sequence parallelism, off while decoding),
    two prompts of different lengths, KV cache, greedy: the unsharded no-cache loop's text."""
    run_dir, _ = doc_run
    args = ["--checkpoint", str(run_dir), "--max-new-tokens", "16", "--temperature", "0"]
    args += [a for p in PROMPTS for a in ("--prompt", p)] + [
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
    ]
    proc = run_script("generate.py", args, "torchrun", 2)
    want = "".join(
        f"--- [{i}] ---\n{text}\n" for i, text in enumerate(_reference_continuations(run_dir, shards_dir, 16))
    )
    assert want in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_pipeline_with_document_mask_equals_one_process_and_samples(doc_run, shards_dir, tmp_path):
    """deepspeed, pp 2: position and document ids travel between the stages; the end-of-run
    sample is drawn through the stages' KV caches and is the single process's sample."""
    run_dir, stdout = doc_run
    overrides = tiny_overrides(
        tmp_path, shards_dir, **{"training.max_steps": 10, "data.document_mask": True, "parallel.pp": 2}
    )
    proc = run_pretrain(overrides, "deepspeed", 2)
    assert_losses_equal(step_losses(run_dir), step_losses(tmp_path), range(1, 11))
    assert abs(_last_val_loss(tmp_path) - _last_val_loss(run_dir)) <= 1e-5
    assert "skipped" not in proc.stdout
    sample = stdout.split("--- sample ---\n")[1].split("\n--------------")[0]
    assert f"--- sample ---\n{sample}\n---" in proc.stdout and len(sample) > len("def ")


@pytest.mark.slow
def test_missing_checkpoint_is_one_line_error(tmp_path):
    proc = run_script("evaluate.py", ["--checkpoint", str(tmp_path / "nope")])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "is not a megalm checkpoint" in lines[0], proc.stderr


def test_token_bytes_count_the_text_exactly(tokenizer_path, corpus_dir):
    """Bits per byte's denominator: the tokens' bytes add up to the UTF-8 bytes of the text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    per_token = token_bytes(tokenizer_path)
    eos = tok.token_to_id("<|endoftext|>")
    assert per_token[eos] == 0
    for text in ["def f(x):\n    return x  # é, ü, 你好, 🙂", "plain ascii", "\t\n  "]:
        assert int(per_token[tok.encode(text).ids].sum()) == len(text.encode("utf-8"))
    windows = text_windows([str(corpus_dir)], tokenizer_path, 64, eos)
    labels = np.concatenate([windows.window(i)[1:] for i in range(3)])
    assert len(windows) > 100 and labels.shape == (3 * 64,)


def test_overrides_after_data_are_taken_as_overrides(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("x")
    assert split_overrides([str(text), "parallel.tp=2"], ["zero.stage=1"]) == (
        [str(text)],
        ["parallel.tp=2", "zero.stage=1"],
    )
