"""What incremental decoding keeps between steps: keys/values per layer, or an LSTM's state.

A generation step feeds only the new tokens; attention layers read the earlier
tokens' keys and values from here instead of recomputing them (the "KV cache" of
Pope et al. 2022, section 2), an LSTM resumes from its last hidden/cell state.

Rows of a batch are left-padded to one length: slot ``s`` of row ``b`` holds a
real token when ``s >= pad[b]``. :attr:`KVCache.doc_ids` records, per stored slot,
document id 0 (padding) or 1 (prompt and generated tokens), which is what the
attention kernels' ``doc_ids`` masking expects: real tokens never see padding.

One step is ``begin(doc_ids)`` (the new tokens' ids), the model's forward (each
layer calls :meth:`LayerCache.update`), then ``commit()``. Under tensor
parallelism each rank caches its own K/V heads; under pipeline parallelism each
stage caches its own layers.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every attention layer (or a recurrent state) for up to ``max_len`` tokens.

    Args:
        max_len: slots per row (the model's ``seq_len``: positions beyond it do not exist).

    Attributes:
        length: tokens stored per row (committed steps).
        doc_ids: (B, max_len) document id of each slot (0 padding, 1 text), or None before
            the first step.
        state: free slot for a recurrent model's state (``megalm.model.lstm``).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.doc_ids: torch.Tensor | None = None
        self.state: object | None = None
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._pending = 0

    def begin(self, n_tokens: int, doc_ids: torch.Tensor | None = None) -> None:
        """Start a step that feeds ``n_tokens`` per row; doc_ids: their (B, n_tokens) document
        ids, or None when no row is padded (then never given)."""
        if self.length + n_tokens > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} tokens; {self.length} stored + {n_tokens} new do not fit"
            )
        if doc_ids is not None:
            if self.doc_ids is None:
                self.doc_ids = doc_ids.new_zeros(doc_ids.size(0), self.max_len)
            self.doc_ids[:, self.length : self.length + n_tokens] = doc_ids
        self._pending = n_tokens

    def commit(self) -> None:
        """End the step: the tokens fed since :meth:`begin` count as stored."""
        self.length += self._pending
        self._pending = 0

    def layer(self, index: int) -> LayerCache:
        """Layer ``index``'s view (the index is global: pipeline stages use their own blocks' indices)."""
        return LayerCache(self, index)

    def store(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, h, T, hs) of layer ``index`` at the current step; return every stored
        slot's keys and values (B, h, length + T, hs) (views into the preallocated buffers)."""
        if index not in self._keys:
            B, h, _, hs = k.shape
            self._keys[index] = k.new_zeros(B, h, self.max_len, hs)
            self._values[index] = v.new_zeros(B, h, self.max_len, hs)
        L, T = self.length, k.size(2)
        keys, values = self._keys[index], self._values[index]
        keys[:, :, L : L + T] = k
        values[:, :, L : L + T] = v
        return keys[:, :, : L + T], values[:, :, : L + T]


class LayerCache:
    """One attention layer's view of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    @property
    def length(self) -> int:
        """Tokens stored before this step."""
        return self.cache.length

    def update(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store this step's k/v (B, h, T, hs); return all keys, values (B, h, L + T, hs) and
        their document ids (B, L + T) (None when :meth:`KVCache.begin` was not given any)."""
        keys, values = self.cache.store(self.index, k, v)
        ids = self.cache.doc_ids
        return keys, values, None if ids is None else ids[:, : keys.size(2)]
