"""Held-out loss at fixed windows, and the end-of-run text sample."""

from __future__ import annotations

from pathlib import Path

import torch

from megalm.config import Config
from megalm.data import eval_batches
from megalm.model import Sampling, decoding, generate
from megalm.parallel import ParallelContext
from megalm.train.metrics import MetricsLog
from megalm.train.strategy import Strategy


class Evaluator:
    """Mean held-out loss over the first ``eval_batches * global_batch`` validation windows,
    every ``training.eval_interval`` steps and at the last step (the same windows each time).

    Args:
        val_windows: the held-out :class:`megalm.data.PackedWindows`, or ``None`` (no split).
        ctx: the grid: this rank takes its data-parallel slice of the windows and its
            context-parallel tokens of each.
        log: rank 0's metrics log (records ``{"step", "val_loss"}``), ``None`` elsewhere.
    """

    def __init__(
        self, cfg: Config, strategy: Strategy, val_windows, ctx: ParallelContext, log: MetricsLog | None
    ) -> None:
        self.cfg, self.strategy, self.val_windows = cfg, strategy, val_windows
        self.ctx, self.log = ctx, log
        self.last_step: int | None = None
        self.last_loss: float | None = None

    def due(self, step: int, last_step: bool = False) -> bool:
        return last_step or step % self.cfg.training.eval_interval == 0

    def maybe_run(self, step: int, last_step: bool = False) -> float | None:
        """Collective: evaluate at ``step`` if :meth:`due`."""
        return self.run(step) if self.due(step, last_step) else None

    def run(self, step: int) -> float | None:
        """Collective: the held-out loss at ``step`` (logged on rank 0); ``None`` without a split."""
        if self.val_windows is None:
            return None
        t = self.cfg.training
        n = t.eval_batches * t.global_batch
        c, ids = self.ctx, self.cfg.data.document_mask
        loss = self.strategy.eval_loss(
            eval_batches(self.val_windows, n, t.micro_batch, c.dp_rank, c.dp, ids, c.cp_rank, c.cp)
        )
        self.last_step, self.last_loss = step, loss
        if self.log is not None:
            self.log.write({"step": step, "val_loss": loss})
            print(f"step {step:>5} | held-out loss {loss:.4f}", flush=True)
        return loss


@torch.no_grad()
def sample_text(
    cfg: Config, strategy: Strategy, tokenizer_file: Path, eos_id: int, device: torch.device
) -> str:
    """A continuation of ``training.sample_prompt`` (up to ``training.sample_tokens``, stopping at
    EOS) through the KV cache. Collective: every rank runs it (TP, PP and ZeRO-3 alike)."""
    from tokenizers import Tokenizer

    t, seq_len = cfg.training, cfg.model.seq_len
    tok = Tokenizer.from_file(str(tokenizer_file))
    prompt = tok.encode(t.sample_prompt).ids or [eos_id]
    gen = torch.Generator(device).manual_seed(cfg.run.seed)
    sampling = Sampling(t.sample_temperature, t.sample_top_k)
    with decoding(strategy.module):
        new = generate(
            strategy.lm,
            [prompt],
            min(t.sample_tokens, seq_len - 1),
            seq_len,
            sampling,
            gen,
            eos_id,
            device=device,
        )[0]
    return tok.decode(prompt + new)
