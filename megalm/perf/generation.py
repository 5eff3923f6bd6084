"""Generation throughput: the KV cache against the no-cache loop, side by side in one process.

For each model the same prompts are continued by ``new_tokens`` greedy tokens with the
cache (prefill once, then one token per row per step through the unfused one-row
attention) and without it (the whole sequence every step, the reference), alternating
the two ``repeats`` times (ABBA, :func:`megalm.perf.measure.alternate`); the table reports
the median tokens/s of each and their ratio, and checks both produced the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass

import torch

from megalm.config import ModelConfig
from megalm.model import Sampling, build_model, decoding, generate
from megalm.perf.measure import alternate


@dataclass
class GenerationSpeed:
    """One model's measurement (tokens/s count new tokens of every row)."""

    family: str
    params: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    cached_tokens_per_s: float
    no_cache_tokens_per_s: float
    speedup: float
    same_tokens: bool


def measure(
    cfg: ModelConfig, batch: int, prompt_tokens: int, new_tokens: int, repeats: int
) -> GenerationSpeed:
    """Time greedy generation of ``new_tokens`` after ``prompt_tokens`` random tokens, per row."""
    model = build_model(cfg, init_seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_tokens), generator=gen).tolist()

    def run(use_cache: bool, i: int) -> tuple[list[list[int]], float]:
        start = time.perf_counter()
        out = generate(model, prompts, new_tokens, cfg.seq_len, Sampling(0), use_cache=use_cache)
        return out, time.perf_counter() - start

    with decoding(model):
        outputs, times = alternate({c: functools.partial(run, c) for c in (True, False)}, repeats)
    rate = {k: batch * new_tokens / statistics.median(v) for k, v in times.items()}
    return GenerationSpeed(
        cfg.family,
        sum(p.numel() for p in model.parameters()),
        batch,
        prompt_tokens,
        new_tokens,
        rate[True],
        rate[False],
        rate[True] / rate[False],
        outputs[True] == outputs[False],  # every round's tokens
    )


def bench_models(base: ModelConfig, families: list[str], new_tokens: int) -> list[ModelConfig]:
    """``base`` per family, with room for the prompt and ``new_tokens`` in ``seq_len``."""
    seq_len = max(base.seq_len, 2 * new_tokens)
    return [dataclasses.replace(base, family=f, seq_len=seq_len) for f in families]


def table(rows: list[GenerationSpeed]) -> str:
    """The measurements as a text table."""
    head = (
        f"{'family':<7}{'params':>10}{'batch':>6}{'prompt':>7}{'new':>5}"
        f"{'cache tok/s':>13}{'no-cache tok/s':>16}{'speed-up':>10}  same tokens"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.family:<7}{r.params / 1e6:>9.2f}M{r.batch:>6}{r.prompt_tokens:>7}{r.new_tokens:>5}"
            f"{r.cached_tokens_per_s:>13.1f}{r.no_cache_tokens_per_s:>16.1f}{r.speedup:>9.1f}x"
            f"  {r.same_tokens}"
        )
    return "\n".join(lines)
