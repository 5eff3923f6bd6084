"""The global sample order: per-dataset epoch permutations and an exact blending schedule.

Nothing here knows about ranks or workers: the order is a function of the data
(window counts), the seed and the position in the stream, so every layout reads
the same sequence and any layout can continue it.

Blending (Megatron's ``BlendedDataset`` rule, made incremental): sample ``p`` of
the blended stream goes to the dataset with the largest deficit
``w_k * (p + 1) - c_k(p)`` (lowest ``k`` on ties), where ``c_k(p)`` counts the
samples dataset ``k`` got so far. This keeps ``|c_k(p) - w_k p| < 1`` for every
prefix, hence every contiguous window of ``N`` samples holds ``w_k N`` samples
of dataset ``k`` to within 1 when it starts at a step boundary from 0 and within
2 anywhere (exact ±1 for every window is impossible for three or more weights
in general: Fraenkel's conjecture). The decision depends only on ``(p, c(p))``,
so the state of the schedule is the count vector.
"""

from __future__ import annotations

import numpy as np


class GlobalOrderSampler:
    """Epoch ``e`` of a dataset with ``n`` windows visits them in ``permutation(seed, e)``."""

    def __init__(self, n_windows: int, seed: int) -> None:
        if n_windows <= 0:
            raise ValueError("a dataset needs at least one window")
        self.n, self.seed = n_windows, seed
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Window indices at this dataset's stream positions ``[start, start + count)`` (may cross epochs)."""
        out = np.empty(count, dtype=np.int64)
        k = 0
        while k < count:
            epoch, pos = divmod(start + k, self.n)
            take = min(count - k, self.n - pos)
            out[k : k + take] = self._permutation(epoch)[pos : pos + take]
            k += take
        return out


class BlendSchedule:
    """Which dataset each blended-stream sample comes from (see module docstring).

    Args:
        weights: non-negative, any scale; normalised to sum to 1.
    """

    def __init__(self, weights: list[float]) -> None:
        total = float(sum(weights))
        if not weights or min(weights) < 0 or total <= 0:
            raise ValueError(f"blend weights must be non-negative with a positive sum, got {weights}")
        self.weights = [w / total for w in weights]

    def assign(self, start: int, counts: list[int], n: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The next ``n`` samples from stream position ``start`` with per-dataset ``counts`` so far.

        Returns:
            (dataset of each sample, that dataset's local position of each sample, counts after).
        """
        counts = list(counts)
        which = np.empty(n, dtype=np.int64)
        local = np.empty(n, dtype=np.int64)
        if len(self.weights) == 1:
            which[:] = 0
            local[:] = np.arange(counts[0], counts[0] + n)
            return which, local, [counts[0] + n]
        w = self.weights
        for j in range(n):
            p1 = start + j + 1
            k = max(range(len(w)), key=lambda i: (w[i] * p1 - counts[i], -i))
            which[j], local[j] = k, counts[k]
            counts[k] += 1
        return which, local, counts
