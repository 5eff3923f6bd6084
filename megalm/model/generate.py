"""Autoregressive generation: batched prompts, a KV cache (or the no-cache loop), sampling.

Prompts of different lengths are left-padded to one length ``T0``. Row ``b``'s
padding is document 0 and its text document 1 (``doc_ids``), its positions count
from its first real token, so every model path (flash, unfused, SDPA, Triton;
llama RoPE, gpt2 learned positions; the LSTM, which starts each row at its text)
sees each prompt exactly as if it were alone.

With the cache (:class:`megalm.model.kv_cache.KVCache`) the first step runs the
padded prompts once (prefill) and every later step feeds one token per row; each
attention layer attends that row to its cached keys through
:func:`kernels.unfused_attention` (the fused scale-mask-softmax kernel). Without
the cache every step reruns the whole sequence: the reference the cache must
equal (greedy decoding gives the same tokens).

The model is any callable ``lm(tokens, position_ids=, doc_ids=, cache=)`` returning
logits (B, T, V) over the real vocabulary (:class:`megalm.model.GPT`,
:class:`megalm.model.lstm.LSTMLM`, the pipeline-parallel stages of
``megalm.train.generation``; only the last position's logits are read). Under tensor
parallelism the logits are gathered and the padded vocabulary is cut, so every
rank samples the same token from the same seeded generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from megalm.model.kv_cache import KVCache
from megalm.model.layers import set_decode_fusion, zero3_partitioned


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits ``z`` (V,).

    ``temperature`` 0 is greedy (``argmax z``); otherwise ``softmax(z / temperature)``
    restricted to the ``top_k`` most likely tokens (0: all) and then to the smallest
    set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020;
    1.0: all). The most likely token always survives both filters.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got temperature={self.temperature}, "
                f"top_k={self.top_k}, top_p={self.top_p}"
            )


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64, as :class:`Sampling` describes."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(z, min(sampling.top_k, z.size(-1))).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop = torch.zeros_like(z, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p)
        z = z.masked_fill(drop, float("-inf"))
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class Batch:
    """Left-padded prompts: tokens (B, T0), positions (B, T0), doc_ids (B, T0) or None (no row padded)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor | None


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Prompts (token lists, none empty) as one left-padded batch (see the module docstring)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T0 = max(len(p) for p in prompts)
    pad = torch.tensor([T0 - len(p) for p in prompts], device=device)  # (B,)
    tokens = torch.tensor([[pad_id] * (T0 - len(p)) + list(p) for p in prompts], device=device)
    slots = torch.arange(T0, device=device)[None]  # (1, T0)
    positions = (slots - pad[:, None]).clamp_min(0)  # (B, T0)
    doc_ids = (slots >= pad[:, None]).long() if bool(pad.any()) else None
    return Batch(tokens, positions, doc_ids)


def fit_prompts(prompts: list[list[int]], max_new_tokens: int, seq_len: int) -> list[list[int]]:
    """Keep the last ``seq_len - max_new_tokens`` tokens of each prompt, so the prompt and
    every new token have a position (``model.seq_len`` of them)."""
    if not 0 < max_new_tokens < seq_len:
        raise ValueError(
            f"max_new_tokens must be in [1, {seq_len - 1}] (model.seq_len={seq_len} positions hold the "
            f"prompt and the new tokens), got {max_new_tokens}"
        )
    room = seq_len - max_new_tokens
    return [list(p[-room:]) for p in prompts]


@torch.no_grad()
def generate(
    lm: Callable[..., torch.Tensor],
    prompts: list[list[int]],
    max_new_tokens: int,
    seq_len: int,
    sampling: Sampling = Sampling(),  # noqa: B008 - frozen dataclass
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    device: torch.device | str = "cpu",
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        lm: the model callable (module docstring); call it inside :func:`decoding`.
        prompts: token ids per row (lengths may differ); the oldest tokens beyond
            ``seq_len - max_new_tokens`` are dropped (:func:`fit_prompts`).
        seq_len: the model's context (``model.seq_len``).
        eos_id: a row stops after producing it (kept in its output); generation ends
            when every row has; also the padding id.
        use_cache: KV cache (True) or rerun the whole sequence every step (False).
        on_tokens: called after every step with the new tokens (B,) and which rows had
            already finished before it (B,) bool: for streaming.

    Returns:
        The new tokens of each row (EOS included when produced).
    """
    batch = left_pad(fit_prompts(prompts, max_new_tokens, seq_len), eos_id or 0, device)
    B, T0 = batch.tokens.shape
    cache = KVCache(T0 + max_new_tokens) if use_cache else None
    feed = tokens, positions, doc_ids = batch.tokens, batch.position_ids, batch.doc_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits = _forward(lm, *feed, cache)  # (B, V)
        nxt = sample_next(logits, sampling, generator)  # (B,)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
        if on_tokens is not None:
            on_tokens(nxt, finished)
        out.append(nxt)
        if eos_id is not None:
            finished = finished | (nxt == eos_id)
            if bool(finished.all()):
                break
        new_pos = positions[:, -1:] + 1  # (B, 1)
        new_doc = None if doc_ids is None else torch.ones_like(new_pos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        positions = torch.cat([positions, new_pos], dim=1)
        doc_ids = None if doc_ids is None else torch.cat([doc_ids, new_doc], dim=1)
        feed = (nxt[:, None], new_pos, new_doc) if use_cache else (tokens, positions, doc_ids)
    return _rows(torch.stack(out, dim=1), eos_id)


def _forward(lm, tokens, positions, doc_ids, cache: KVCache | None) -> torch.Tensor:
    """The last position's logits (B, V) in fp32; one cache step when ``cache`` is given."""
    if cache is None:
        return lm(tokens, position_ids=positions, doc_ids=doc_ids)[:, -1].float()
    cache.begin(tokens.size(1), doc_ids)
    logits = lm(tokens, position_ids=positions, doc_ids=doc_ids, cache=cache)[:, -1].float()
    cache.commit()
    return logits


def _rows(new: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """(B, n) new tokens -> per row, up to and including its first EOS."""
    rows = []
    for row in new.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        rows.append(row)
    return rows


@contextlib.contextmanager
def decoding(module: nn.Module) -> Iterator[None]:
    """Eval mode with sequence and context parallelism off for the duration (then restored).

    A decode step feeds one token per row, which cannot be split over TP ranks; without
    gradients, sequence parallelism only changes where tokens live (each rank holds all
    of them instead of 1/tp), not the math, so its modules run as plain TP. Likewise
    context parallelism (``cp_group``): every cp rank holds the same weights, so each one
    decodes the whole sequence itself (cp = 1 math, no ring), as the KV cache needs.
    Projections that share an input run as one GEMM (:func:`megalm.model.layers.fused_projection`).
    """
    flagged = [m for m in module.modules() if getattr(m, "sequence_parallel", False)]
    cp_groups = [(m, m.cp_group) for m in module.modules() if getattr(m, "cp_group", None) is not None]
    training = module.training
    module.eval()
    for m in flagged:
        m.sequence_parallel = False
    for m, _ in cp_groups:
        m.cp_group = None
    set_decode_fusion(module, True)
    partitioned = zero3_partitioned(module)
    try:
        with contextlib.nullcontext() if partitioned else torch.inference_mode():
            yield
    finally:
        set_decode_fusion(module, False)
        for m in flagged:
            m.sequence_parallel = True
        for m, group in cp_groups:
            m.cp_group = group
        module.train(training)
