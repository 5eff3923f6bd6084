"""Pack documents into fixed windows and hand out a layout-independent global batch order.

Packing: documents are concatenated with EOS after each one, then cut into
non-overlapping windows of ``seq_len + 1`` tokens (inputs = window[:-1],
labels = window[1:]); the stride is ``seq_len`` so every token is a label once.

Order: the stream of samples is epoch-major; epoch ``e`` visits the windows in
``permutation(seed, e)``. Optimizer step ``s`` consumes stream positions
``[s*G, (s+1)*G)`` for global batch ``G``; data-parallel rank ``d`` takes the
positions ``j*m*dp + d*m + [0, m)`` for its micro-batch ``j`` (micro-batch ``m``).
The set of samples in a step therefore does not depend on ``dp`` or ``m``, which
is what makes losses equal across layouts, and the state is one integer (samples
consumed), so a resume with a different data-parallel size continues the same
order.
"""

from __future__ import annotations

import numpy as np
import torch


class PackedWindows:
    """Documents packed into ``n`` windows of ``seq_len + 1`` tokens."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, eos_id: int) -> None:
        if not docs:
            raise ValueError("no documents to pack")
        dtype = docs[0].dtype
        eos = np.array([eos_id], dtype=dtype)
        self.tokens = np.concatenate([part for d in docs for part in (d, eos)])
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def window(self, i: int) -> np.ndarray:
        """Window ``i``: (seq_len + 1,) token ids."""
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (len(indices), seq_len) int64."""
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]).astype(np.int64))
        return w[:, :-1], w[:, 1:]


class GlobalOrderSampler:
    """Deterministic, layout-independent order of window indices (see module docstring)."""

    def __init__(self, n_windows: int, seed: int) -> None:
        self.n, self.seed = n_windows, seed
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Window indices at stream positions ``[start, start + count)`` (may cross epochs)."""
        out = np.empty(count, dtype=np.int64)
        for k in range(count):
            epoch, pos = divmod(start + k, self.n)
            out[k] = self._permutation(epoch)[pos]
        return out


class TrainBatches:
    """Micro-batches for one data-parallel rank; state is the global sample count."""

    def __init__(self, windows: PackedWindows, seed: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp_size: int) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"training.global_batch ({global_batch}) must be divisible by "
                             f"training.micro_batch ({micro_batch}) * dp ({dp_size})")
        self.windows = windows
        self.sampler = GlobalOrderSampler(len(windows), seed)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.accum = global_batch // (micro_batch * dp_size)
        self.consumed = 0  # global samples consumed by completed steps

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``accum`` micro-batches of this rank for the next optimizer step."""
        m, dp = self.micro_batch, self.dp_size
        out = []
        for j in range(self.accum):
            start = self.consumed + j * m * dp + self.dp_rank * m
            out.append(self.windows.batch(self.sampler.indices(start, m)))
        self.consumed += self.global_batch
        return out

    @property
    def epoch(self) -> float:
        """Fractional epochs completed."""
        return self.consumed / len(self.windows)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.sampler.seed, "n_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != len(self.windows) or state["seed"] != self.sampler.seed:
            raise ValueError(
                f"checkpoint was made on data with {state['n_windows']} windows and seed "
                f"{state['seed']}, this run has {len(self.windows)} and {self.sampler.seed}; resume "
                "with the same data.dir, data.seed and model.seq_len, or start fresh with training.resume=never"
            )
        self.consumed = state["consumed"]


def eval_batches(windows: PackedWindows, n_samples: int, micro_batch: int, dp_rank: int,
                 dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_samples`` windows (wrapping if fewer), rank ``d`` taking every dp-th.

    ``n_samples`` must be a multiple of ``micro_batch * dp_size`` so every rank runs
    the same number of forward passes (required under ZeRO-3).
    """
    idx = np.arange(dp_rank, n_samples, dp_size) % len(windows)
    return [windows.batch(idx[i : i + micro_batch]) for i in range(0, len(idx), micro_batch)]
