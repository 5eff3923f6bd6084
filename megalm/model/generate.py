"""Autoregressive sampling (no KV cache: meant for short samples from small models)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    seq_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """Sample continuations of ``prompt``.

    Args:
        model: returns logits (B, T, V) for tokens (B, T).
        prompt: (B, T0) int64.
        seq_len: context window; older tokens are cropped.
        temperature: 0 means greedy.
        top_k: keep only the k most likely tokens (0 = all).
        stop_token: stop once every row has produced it.

    Returns:
        (B, T0 + n) tokens, n <= max_new_tokens.
    """
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -seq_len:])[:, -1, :].float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
        if stop_token is not None and bool((nxt == stop_token).all()):
            break
    return tokens
