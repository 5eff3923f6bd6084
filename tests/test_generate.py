"""Generation: the KV cache equals the no-cache loop, left padding equals running rows alone,
sampling filters, EOS, tensor parallelism (gloo), and the cache's speed-up is benchmarked
(``launch/bench_generate.py``), never timed here."""

from __future__ import annotations

import pytest
import torch

import megalm.model.layers as layers
from megalm.config import ModelConfig
from megalm.model import GPT, Sampling, build_model, decoding, generate
from megalm.model.generate import left_pad, sample_next
from megalm.parallel import ParallelContext, ParallelDims
from tests.distributed import run_distributed

PROMPTS = [[5, 9, 2, 44, 17, 3, 8], [81], [12, 30, 30, 7]]  # different lengths: left padding


def _cfg(family: str, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=500, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, seq_len=48)
    base.update(kw)
    return ModelConfig(**base)


def _greedy(model, prompts, n: int, use_cache: bool, eos_id: int | None = None) -> list[list[int]]:
    with decoding(model):
        return generate(model, prompts, n, model.cfg.seq_len, Sampling(0), None, eos_id, use_cache)


@pytest.mark.parametrize(
    "family, attention",
    [("llama", "flash"), ("llama", "unfused"), ("gpt2", "flash"), ("gpt2", "unfused"), ("lstm", "-")],
)
def test_kv_cache_greedy_equals_no_cache_loop_and_rows_alone(family, attention):
    """Batched, left-padded prompts: the cached decode gives the no-cache loop's tokens, and
    each row gives what it gives when generated alone (padding invisible)."""
    cfg = _cfg(family) if family == "lstm" else _cfg(family, attention=attention)
    model = build_model(cfg, init_seed=3)
    cached = _greedy(model, PROMPTS, 24, use_cache=True)
    assert cached == _greedy(model, PROMPTS, 24, use_cache=False)
    assert cached == [_greedy(model, [p], 24, use_cache=False)[0] for p in PROMPTS]
    assert all(len(row) == 24 for row in cached)


def test_decode_steps_run_one_query_row_through_unfused_attention(monkeypatch):
    """Prefill takes the window path (flash here); every later step attends one query row per
    sequence to the cache through kernels.unfused_attention (the fused softmax kernel)."""
    calls = []
    original = layers.unfused_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2], kw.get("kv_doc_ids") is not None))
        return original(q, k, v, **kw)

    monkeypatch.setattr(layers, "unfused_attention", spy)
    model = GPT(_cfg("llama"), init_seed=1)
    _greedy(model, PROMPTS, 5, use_cache=True)
    T0 = max(len(p) for p in PROMPTS)
    per_layer = [(1, T0 + step, True) for step in range(1, 5)]  # 4 decode steps after the prefill
    assert calls == [c for c in per_layer for _ in range(2)]  # two layers each


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoding_fuses_projections_and_equals_the_training_forward(family):
    """Inside ``decoding`` q/k/v (and SwiGLU's W1/W3) run as one GEMM each; the cached steps'
    logits equal the plain eval-mode forward of the whole sequence (no decoding context)."""
    from megalm.model.kv_cache import KVCache

    model = build_model(_cfg(family), init_seed=5).eval()
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens)  # (2, 12, V): separate projections
        with decoding(model):
            cache = KVCache(12)
            steps = []
            for lo, hi in [(0, 9), (9, 10), (10, 11), (11, 12)]:  # prefill, then one token at a time
                cache.begin(hi - lo)
                steps.append(
                    model(
                        tokens[:, lo:hi], position_ids=torch.arange(lo, hi)[None].expand(2, -1), cache=cache
                    )
                )
                cache.commit()
            fused = [m.decode_fused for m in model.modules() if getattr(m, "decode_fused", None) is not None]
        assert all(isinstance(f, tuple) for f in fused) and len(fused) == (4 if family == "llama" else 2)
        assert all(getattr(m, "decode_fused", None) is None for m in model.modules())  # dropped after
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_eos_per_row():
    """A row that produced EOS keeps it as its last token; generation ends when all rows have."""
    vocab, eos = 11, 10

    def lm(tokens, position_ids=None, doc_ids=None, cache=None):
        logits = torch.zeros(tokens.size(0), tokens.size(1), vocab)
        n = position_ids[:, -1]  # row b: token 1, then EOS once it is at position 2 + b
        logits[:, -1, 1] = 1.0
        logits[torch.arange(tokens.size(0)), -1, eos] = (
            n + 1 >= 3 + torch.arange(tokens.size(0))
        ).float() * 2
        return logits

    rows = generate(lm, [[1], [1]], 20, 32, Sampling(0), eos_id=eos, use_cache=False)
    assert rows == [[1, 1, eos], [1, 1, 1, eos]]


def test_sampling_filters_and_seed():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top = logits.argmax(-1)
    assert torch.equal(sample_next(logits, Sampling(0)), top)
    assert torch.equal(sample_next(logits, Sampling(1.0, top_k=1)), top)
    assert torch.equal(sample_next(logits, Sampling(1.0, top_p=1e-6)), top)  # the top token always survives
    draw = [sample_next(logits, Sampling(0.9, 5, 0.9), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    top5 = logits.topk(5).indices
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        picked = sample_next(logits, Sampling(1.5, top_k=5), gen)
        assert (top5 == picked[:, None]).any(-1).all()
    # nucleus: tokens outside the smallest set reaching p never appear
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < 0.5
    for _ in range(200):
        picked = sample_next(logits, Sampling(1.0, top_p=0.5), gen)
        rank = (order == picked[:, None]).float().argmax(-1)
        assert keep.gather(1, rank[:, None]).all()
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)


def test_left_padding_positions_and_documents():
    batch = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert batch.tokens.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.doc_ids.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1, 2], [3, 4]], 0).doc_ids is None  # nothing padded: no mask at all


def test_prompt_longer_than_the_context_keeps_its_end():
    model = GPT(_cfg("gpt2", seq_len=16), init_seed=2)
    long = list(range(1, 40))
    assert _greedy(model, [long], 6, True) == _greedy(model, [long[-10:]], 6, True)
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 15\]"):
        _greedy(model, [long], 16, True)


def _tp_generation(rank: int, world: int, family: str) -> tuple:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=world))
    cfg = _cfg(family, n_kv_heads=1)  # K/V heads replicated over the TP ranks
    full = GPT(cfg, init_seed=5)
    widths = []

    def reference(tokens, **kw):
        logits = full(tokens, **kw)
        widths.append(logits.size(-1))
        return logits

    sharded = GPT(cfg, ctx.tp_group, sequence_parallel=True, init_seed=5)
    with decoding(sharded), decoding(full):
        cached = generate(sharded, PROMPTS, 20, cfg.seq_len, Sampling(0))
        loop = generate(reference, PROMPTS, 20, cfg.seq_len, Sampling(0), use_cache=False)
        sampled = generate(
            sharded, PROMPTS, 20, cfg.seq_len, Sampling(1.0, 40), torch.Generator().manual_seed(3)
        )
    assert sharded.embed.tok_emb.weight.size(0) * world == cfg.padded_vocab(world) > cfg.vocab_size
    return cached, loop, sampled, set(widths)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp2_kv_cache_greedy_equals_unsharded_no_cache_loop(family):
    """tp 2 with sequence parallelism (turned off for decoding) and replicated K/V heads: the
    cached greedy tokens equal the unsharded no-cache loop's; sampling agrees across ranks and
    only real vocabulary ids come out (the padded columns are cut before sampling)."""
    (c0, loop, s0, widths), (c1, _, s1, _) = run_distributed(2, _tp_generation, family)
    assert c0 == c1 == loop
    assert s0 == s1
    assert widths == {500}
    assert all(0 <= t < 500 for row in s0 for t in row)


def test_lstm_cache_is_its_recurrent_state():
    model = build_model(_cfg("lstm"), init_seed=4)
    assert _greedy(model, PROMPTS, 12, True) == _greedy(model, PROMPTS, 12, False)
    # the generic cache carries (h, c) of n_layers x batch x d
    from megalm.model import KVCache

    cache = KVCache(16)
    cache.begin(3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    cache.commit()
    h, c = cache.state
    assert h.shape == c.shape == (2, 1, 64) and cache.length == 3


def test_decoding_restores_training_mode():
    model = GPT(_cfg("llama"))
    model.train()
    with decoding(model):
        assert not model.training
    assert model.training
