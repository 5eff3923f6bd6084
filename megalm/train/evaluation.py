"""Held-out loss at fixed windows, and the end-of-run text sample."""

from __future__ import annotations

from pathlib import Path

import torch

from megalm.config import Config
from megalm.data import eval_batches
from megalm.model import generate
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
        c = self.ctx
        loss = self.strategy.eval_loss(
            eval_batches(self.val_windows, n, t.micro_batch, c.dp_rank, c.dp, c.cp_rank, c.cp)
        )
        self.last_step, self.last_loss = step, loss
        if self.log is not None:
            self.log.write({"step": step, "val_loss": loss})
            print(f"step {step:>5} | held-out loss {loss:.4f}", flush=True)
        return loss


@torch.no_grad()
def sample_text(cfg: Config, strategy: Strategy, tokenizer_file: Path, device: torch.device) -> str:
    """A short continuation of ``training.sample_prompt`` (every rank runs it; ZeRO-3 safe)."""
    from tokenizers import Tokenizer

    t = cfg.training
    tok = Tokenizer.from_file(str(tokenizer_file))
    prompt = torch.tensor([tok.encode(t.sample_prompt).ids or [0]], device=device)
    gen = torch.Generator(device).manual_seed(cfg.run.seed)
    strategy.engine.eval()
    out = generate(
        strategy.logits, prompt, t.sample_tokens, cfg.model.seq_len, t.sample_temperature, t.sample_top_k, gen
    )
    strategy.engine.train()
    return tok.decode(out[0].tolist())
