"""``launch/generate.py``: continue prompts with a trained checkpoint, streaming to stdout.

    python launch/generate.py --checkpoint RUN/checkpoints/latest --prompt "def " [--prompt ...]
        [--prompt-file F ...] --max-new-tokens N --temperature T --top-k K --top-p P --seed S
        [--no-cache] [key=value ...]

Prompts of different lengths run as one left-padded batch through the KV cache
(:mod:`megalm.model.generate`); each row stops at EOS. One prompt streams its text
as tokens arrive; several print each continuation when the batch is done (rank 0
prints; every rank computes: TP, PP, ZeRO-3 as the trainer runs them). Greedy
decoding (``--temperature 0``) gives the no-cache loop's tokens (``--no-cache``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megalm.config import ConfigError
from megalm.model import Sampling, decoding, generate
from megalm.train.inference import open_checkpoint


class Streamer:
    """Prints row 0's new text as tokens arrive (holding back a partial UTF-8 character)."""

    def __init__(self, tokenizer, enabled: bool) -> None:
        self.tok, self.enabled = tokenizer, enabled
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, new: torch.Tensor, finished: torch.Tensor) -> None:
        if not self.enabled or bool(finished[0]):
            return
        self.ids.append(int(new[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
            return
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text


def read_prompts(prompts: list[str], files: list[Path]) -> list[str]:
    """``--prompt`` texts then ``--prompt-file`` contents (a file is one prompt)."""
    out = list(prompts)
    for f in files:
        if not f.is_file():
            raise ConfigError(f"--prompt-file '{f}' does not exist")
        out.append(f.read_text())
    if not out:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``launch/generate.py`` command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="Generate text from a megalm checkpoint.")
    p.add_argument(
        "--checkpoint", required=True, help="RUN, RUN/checkpoints, RUN/checkpoints/latest or a tag"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", type=Path, default=[], help="a file holding one prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: no nucleus filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="rerun the whole sequence every step (reference)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2")
    args = p.parse_args(argv)
    texts = read_prompts(args.prompt, args.prompt_file)
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise ConfigError(f"--temperature/--top-k/--top-p: {e}") from None
    loaded = open_checkpoint(args.checkpoint, args.overrides)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(loaded.manifest.tokenizer_file))
    eos, device, seq_len = loaded.manifest.eos_id, loaded.info.device, loaded.cfg.model.seq_len
    if not 0 < args.max_new_tokens < seq_len:
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens} must be in [1, {seq_len - 1}]: the model's "
            f"{seq_len} positions (model.seq_len) hold the prompt and the new tokens"
        )
    prompts = [tok.encode(t).ids or [eos] for t in texts]
    stream = Streamer(tok, loaded.rank0 and len(prompts) == 1)
    if stream.enabled:
        sys.stdout.write(texts[0])
    gen = torch.Generator(device).manual_seed(args.seed)
    with decoding(loaded.strategy.module):
        rows = generate(
            loaded.strategy.lm, prompts, args.max_new_tokens, seq_len, sampling, gen, eos,
            use_cache=not args.no_cache, device=device, on_tokens=stream,
        )  # fmt: skip
    if loaded.rank0:
        if stream.enabled:
            print(flush=True)
        else:
            for i, (text, row) in enumerate(zip(texts, rows, strict=True)):
                print(f"--- [{i}] ---\n{text}{tok.decode(row)}", flush=True)
    return 0
