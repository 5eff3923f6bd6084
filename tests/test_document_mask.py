"""``data.document_mask``: a packed window equals running each of its documents alone
(logits, loss and gradients within 1e-5), on the PyTorch paths (SDPA with a block-diagonal
mask, unfused softmax), with activation recompute and under tensor + sequence parallelism.
The Triton kernels' version is ``tests/kernels/test_attention_paths.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalm.config import ConfigError, ModelConfig, load_config
from megalm.data import PackedWindows
from megalm.model import GPT
from megalm.parallel import ParallelContext, ParallelDims
from tests.distributed import run_distributed

V = 500  # pads to 512 for tp 1 and 2: the same initial weights
LENGTHS = [9, 1, 14, 8]  # documents (each followed by EOS) packed into one window of 35 tokens


def _cfg(family: str, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=V, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seq_len=36)
    base.update(kw)
    return ModelConfig(**base)


def packed_window(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """(tokens, labels, position_ids, doc_ids), each (batch, 35), from the data loader's packing."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(1, V, (n,), generator=gen).numpy() for n in LENGTHS * batch]
    windows = PackedWindows(docs, seq_len=sum(LENGTHS) + len(LENGTHS) - 1, eos_id=0)
    return windows.batch(list(range(batch)), with_ids=True)


def segments(doc_ids: torch.Tensor) -> list[slice]:
    """The contiguous document spans of one row's doc ids."""
    bounds = [0, *(torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten() + 1).tolist(), doc_ids.numel()]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the scale floored at 1e-4: a key bias's gradient is zero in exact
    arithmetic (it shifts every score of a row alike), so only rounding noise is left there."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-4)).item()


def per_document_errors(model: GPT, x, y, pos, doc) -> dict[str, float]:
    """Packed forward/backward vs each document of each row run alone (same labels)."""
    T = x.size(1)
    packed_logits = model(x, position_ids=pos, doc_ids=doc)
    model.zero_grad()
    model(x, y, pos, doc).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    alone_logits = torch.empty_like(packed_logits)
    model.zero_grad()
    for b in range(x.size(0)):
        for s in segments(doc[b]):
            alone_logits[b, s] = model(x[b : b + 1, s])[0]
            # the packed loss is a mean over B * T tokens: weight each document's mean by its share
            (model(x[b : b + 1, s], y[b : b + 1, s]) * (s.stop - s.start) / (x.size(0) * T)).backward()
    errors = {"logits": _rel(packed_logits, alone_logits)}
    ce = F.cross_entropy(alone_logits.reshape(-1, V), y.reshape(-1))
    errors["loss"] = _rel(model(x, y, pos, doc).detach(), ce.detach())
    for n, p in model.named_parameters():
        errors[f"grad {n}"] = _rel(packed_grads[n], p.grad)
    return errors


@pytest.mark.parametrize("attention", ["flash", "unfused"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_window_equals_each_document_alone(family, attention):
    """Positions restart at each document (RoPE / learned) and attention stays inside it."""
    x, y, pos, doc = packed_window()
    assert len(segments(doc[0])) == len(LENGTHS) and pos[0, LENGTHS[0] + 1] == 0
    model = GPT(_cfg(family, attention=attention, kernels="torch"), init_seed=1)
    errors = per_document_errors(model, x, y, pos, doc)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst}: {errors[worst]:.2e}"
    # and the mask matters: without it the later documents see the earlier ones
    assert _rel(model(x), model(x, position_ids=pos, doc_ids=doc)) > 1e-3


def test_document_mask_with_activation_recompute():
    x, y, pos, doc = packed_window(seed=1)
    model = GPT(_cfg("llama", kernels="torch"), init_seed=2)
    model.train()
    plain = per_document_errors(model, x, y, pos, doc)
    model.set_recompute(1)
    model.zero_grad()
    model(x, y, pos, doc).backward()
    recomputed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.set_recompute(0)
    model.zero_grad()
    model(x, y, pos, doc).backward()
    assert max(plain.values()) <= 1e-5
    assert all(
        torch.allclose(recomputed[n], p.grad, rtol=1e-6, atol=1e-7) for n, p in model.named_parameters()
    )


def _tp_documents(rank: int, world: int, family: str) -> dict[str, float]:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=world))
    x, y, pos, doc = packed_window(seed=2)
    x, y, pos, doc = (t[:, :-1] for t in (x, y, pos, doc))  # 34 tokens: divisible by tp for SP
    cfg = _cfg(family, kernels="torch")
    full = GPT(cfg, init_seed=3)
    sharded = GPT(cfg, ctx.tp_group, sequence_parallel=True, init_seed=3)
    errors = {"loss": _rel(sharded(x, y, pos, doc), full(x, y, pos, doc).detach())}
    sharded.eval(), full.eval()
    with torch.no_grad():
        errors["logits"] = _rel(
            sharded(x, position_ids=pos, doc_ids=doc), full(x, position_ids=pos, doc_ids=doc)
        )
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp2_sequence_parallel_document_mask_equals_unsharded(family):
    """Sequence parallelism splits the positions (gpt2's learned table) with the tokens."""
    for errors in run_distributed(2, _tp_documents, family):
        assert max(errors.values()) <= 1e-5, errors


def test_document_mask_is_refused_for_the_lstm():
    with pytest.raises(ConfigError, match="data.document_mask=true needs an attention model"):
        load_config(None, ["model.family=lstm", "data.document_mask=true"])
