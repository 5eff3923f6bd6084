"""lm-eval-harness scores a megalm model through its HF export, offline, as megalm itself would.

The tasks are local JSONL files in tests/lm_eval_task/ (no download). Every log-likelihood
lm-eval reports is recomputed with megalm's own model and tokenizer, so the test checks the
whole route: weights, tokenizer, special tokens and lm-eval's context/continuation split.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from tokenizers import Tokenizer

from data_tools.train_tokenizer import EOS
from megalm.checkpoint.hf import export_hf
from tests.conftest import VENV_BIN, run_checkout, subprocess_env
from tests.test_hf import perturbed_model, tiny_config

pytestmark = pytest.mark.slow
TASKS = "megalm_tiny_mc,megalm_tiny_text"


def lm_eval_command(model_dir, out_dir) -> list[str]:
    """The documented command, with per-sample logging."""
    return [
        str(VENV_BIN / "lm_eval"),
        "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--include_path", "tests/lm_eval_task",
        "--tasks", TASKS,
        "--device", "cpu",
        "--batch_size", "4",
        "--output_path", str(out_dir),
        "--log_samples",
    ]  # fmt: skip


def continuation_logprob(model, tok: Tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) with lm-eval's split: trailing context spaces move to the
    continuation, the pair is encoded whole, an empty context is replaced by EOS (megalm's BOS)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if context:
        whole, ctx = tok.encode(context + continuation).ids, tok.encode(context).ids
        ctx, cont = whole[: len(ctx)], whole[len(ctx) :]
    else:
        ctx, cont = [tok.token_to_id(EOS)], tok.encode(continuation).ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0, len(ctx) - 1 :]  # (len(cont), V)
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def read_outputs(out_dir) -> tuple[dict, dict[str, list[dict]]]:
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in TASKS.split(","):
        (path,) = out_dir.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def test_lm_eval_scores_exported_model_like_megalm(tokenizer_path, tmp_path):
    cfg = dataclasses.replace(tiny_config(tokenizer_path, "llama", 2), seq_len=64)
    model = perturbed_model(cfg)
    export_hf(model.state_dict(), cfg, tokenizer_path, tmp_path / "hf")
    env = subprocess_env() | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # datasets' cache stays in the test's directory
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = run_checkout(lm_eval_command(tmp_path / "hf", tmp_path / "out"), 600, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results, samples = read_outputs(tmp_path / "out")
    tok = Tokenizer.from_file(str(tokenizer_path))

    mc = samples["megalm_tiny_mc"]
    assert len(mc) == 6
    correct, worst = 0, 0.0
    for s in mc:  # arguments: {"gen_args_k": {"arg_0": context, "arg_1": " " + choice k}}
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        assert [cont for _, cont in pairs] == [" " + c for c in s["doc"]["choices"]]
        ours = [continuation_logprob(model, tok, ctx, cont) for ctx, cont in pairs]
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        worst = max(worst, *(abs(a - b) for a, b in zip(ours, theirs, strict=True)))
        assert worst < 1e-3, (ours, theirs)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == int(s["target"]))
    assert results["megalm_tiny_mc"]["acc,none"] == pytest.approx(correct / len(mc))

    text = samples["megalm_tiny_text"]
    assert len(text) == 4
    nll, n_bytes = 0.0, 0
    for s in text:
        doc = s["arguments"]["gen_args_0"]["arg_0"]
        ours = continuation_logprob(model, tok, "", doc)
        worst = max(worst, abs(ours - float(s["filtered_resps"][0])))
        assert worst < 1e-3
        nll, n_bytes = nll - ours, n_bytes + len(doc.encode())
    print(f"lm-eval vs megalm log-likelihoods: max |difference| {worst:.2e}")
    bpb = results["megalm_tiny_text"]["bits_per_byte,none"]
    assert bpb == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
