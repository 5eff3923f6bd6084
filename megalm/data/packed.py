"""Pack documents into fixed windows of ``seq_len + 1`` tokens.

The token stream is every document followed by EOS, in manifest order; window
``i`` is stream positions ``[i*T, i*T + T + 1)`` (inputs = window[:-1], labels =
window[1:]). The stride is ``T`` so every token is a label exactly once; only the
tail shorter than a window is dropped. The stream is never materialised: a
window is gathered from the (memory-mapped) documents it overlaps, found by a
binary search over the documents' start positions, so memory is O(documents).

Optionally a window also carries, per input token, ``position_ids`` (restarting
at 0 after every EOS and at the window start) and ``doc_ids`` (0, 1, 2, ... for
the document segments inside the window; the EOS belongs to the document it
ends), which is what ``kernels.attention``'s ``doc_ids`` masking expects.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Documents(Protocol):
    """Anything with ``len()``, per-document token counts and ``document(i)``."""

    lengths: np.ndarray

    def __len__(self) -> int: ...

    def document(self, i: int) -> np.ndarray: ...


class InMemoryDocuments:
    """A list of token-id arrays as a :class:`Documents` source (tests, small data)."""

    def __init__(self, docs: list[np.ndarray]) -> None:
        self.docs = docs
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s token ids."""
        return self.docs[i]


class PackedWindows:
    """Documents packed, EOS-separated, into ``len(self)`` windows of ``seq_len + 1`` tokens.

    Args:
        docs: a :class:`Documents` source or a list of token-id arrays.
        seq_len: tokens per training sequence ``T``.
        eos_id: the separator appended after every document.
    """

    def __init__(self, docs: Documents | list[np.ndarray], seq_len: int, eos_id: int) -> None:
        self.docs = InMemoryDocuments(docs) if isinstance(docs, list) else docs
        if len(self.docs) == 0:
            raise ValueError("no documents to pack")
        self.seq_len, self.eos_id = seq_len, eos_id
        self.starts = np.zeros(len(self.docs) + 1, dtype=np.int64)  # stream offset of each document
        np.cumsum(self.docs.lengths + 1, out=self.starts[1:])
        self.n = max(0, int(self.starts[-1]) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    @property
    def remote(self) -> bool:
        """Whether the documents come from a remote data set (fetched on first use)."""
        return bool(getattr(self.docs, "remote", False))

    def documents_of(self, i: int) -> range:
        """The documents window ``i`` reads (for the tokens it holds, or only for their EOS)."""
        start, stop = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        first = int(self.starts.searchsorted(start, side="right")) - 1
        last = int(self.starts.searchsorted(stop - 1, side="right")) - 1
        return range(first, last + 1)

    def prefetch(self, i: int) -> None:
        """Have the shards window ``i`` reads fetched in the background (remote data; else nothing)."""
        if self.remote:
            docs = self.documents_of(i)
            self.docs.prefetch(docs.start, docs.stop)

    @property
    def total_tokens(self) -> int:
        """Tokens in the stream (documents plus one EOS each)."""
        return int(self.starts[-1])

    def window(
        self, i: int, with_ids: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window ``i``: (seq_len + 1,) token ids as int64.

        With ``with_ids``: also (seq_len,) ``position_ids`` and ``doc_ids`` of the inputs.
        """
        start, stop = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        out = np.empty(stop - start, dtype=np.int64)
        seg_ends = []  # stream offsets just after each EOS inside the window
        d = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            doc_start, doc = int(self.starts[d]), self.docs.document(d)
            lo, hi = pos - doc_start, min(len(doc), stop - doc_start)
            if lo < hi:
                out[pos - start : pos - start + hi - lo] = doc[lo:hi]
                pos += hi - lo
            if pos < stop and pos == doc_start + len(doc):
                out[pos - start] = self.eos_id
                pos += 1
                seg_ends.append(pos - start)
            d += 1
        if not with_ids:
            return out
        doc_ids = np.zeros(self.seq_len, dtype=np.int64)
        position_ids = np.arange(self.seq_len, dtype=np.int64)
        for end in seg_ends:
            if end < self.seq_len:
                doc_ids[end:] += 1
                position_ids[end:] -= position_ids[end]
        return out, position_ids, doc_ids

    def batch(self, indices: np.ndarray, with_ids: bool = False) -> tuple[torch.Tensor, ...]:
        """(inputs, labels[, position_ids, doc_ids]), each (len(indices), seq_len) int64."""
        if not with_ids:
            w = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
            return w[:, :-1], w[:, 1:]
        parts = [self.window(int(i), with_ids=True) for i in indices]
        w = torch.from_numpy(np.stack([p[0] for p in parts]))
        pos = torch.from_numpy(np.stack([p[1] for p in parts]))
        ids = torch.from_numpy(np.stack([p[2] for p in parts]))
        return w[:, :-1], w[:, 1:], pos, ids
