"""The recurrent baseline: token embedding -> LSTM layers -> linear head.

The language model megalm's founding article builds as its worked example
(``model.family=lstm``), after Zaremba et al. 2014 ("Recurrent Neural Network
Regularization"): ``n_layers`` LSTM layers (Hochreiter & Schmidhuber 1997) of
``d_model`` units, dropout ``model.dropout`` on the embedding output, between
layers and before the head. Per step and layer:

    i, f, g, o = sigma(W_i x + U_i h + b_i), sigma(...), tanh(...), sigma(...)
    c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)

It trains through the same loop, data, loss (:class:`megalm.model.gpt.LMLoss`),
checkpoints and launchers as the Transformer, with data parallelism and ZeRO; it
has no tensor or pipeline split (the layout rules refuse tp/pp > 1). Generation
keeps the (h, c) state in the :class:`megalm.model.kv_cache.KVCache`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.model.gpt import LMLoss, require_vocab
from megalm.model.kv_cache import KVCache
from megalm.parallel.dropout import dropout


class LSTMLM(nn.Module):
    """Embedding (V_padded, d) -> ``nn.LSTM(d, d, n_layers)`` -> head (d -> V_padded).

    ``forward(tokens, labels)`` returns the mean next-token cross entropy,
    ``forward(tokens)`` logits (B, T, V) over the real vocabulary. The head shares
    the embedding when ``model.tie_embeddings`` is true (Press & Wolf 2017).

    Args:
        cfg: ``vocab_size``, ``d_model`` (embedding and hidden size), ``n_layers``,
            ``dropout``, ``init_std``, ``tie_embeddings``.
        tp_group: must be None or of size 1 (no tensor parallelism).
        init_seed: seeds the initialization (``None``: drawn from the global RNG).
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, init_seed: int | None = None) -> None:
        super().__init__()
        require_vocab(cfg)
        if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
            raise ValueError("model.family=lstm has no tensor-parallel split; use parallel.tp=1")
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**62, (1,)).item())
        d, V = cfg.d_model, cfg.padded_vocab(1)
        self.cfg = cfg
        self.embed = nn.Embedding(V, d)
        self.lstm = nn.LSTM(
            d, d, cfg.n_layers, batch_first=True, dropout=cfg.dropout if cfg.n_layers > 1 else 0.0
        )
        self.head = None if cfg.tied else nn.Linear(d, V, bias=False)
        self.loss = LMLoss(cfg, None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            nn.init.normal_(self.embed.weight, 0.0, cfg.init_std)
            self.lstm.reset_parameters()  # U(-1/sqrt(d), 1/sqrt(d)), PyTorch's LSTM default
            if self.head is not None:
                nn.init.normal_(self.head.weight, 0.0, cfg.init_std)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens, labels: (B, T) int64. Returns logits (B, T, V) or a scalar loss.

        position_ids: unused (a recurrence has no positions). doc_ids: (B, T) of a
        left-padded generation batch: each row is read from the first token of its last
        document (the padding before it is skipped, its outputs are zeros).
        cache: resume from / keep the (h, c) state (generation).
        """
        if self.cfg.seq_len < tokens.size(1):
            raise ValueError(f"sequence of {tokens.size(1)} tokens exceeds model.seq_len={self.cfg.seq_len}")
        p = self.cfg.dropout
        x = dropout(self.embed(tokens), p, self.training)  # (B, T, d)
        state = cache.state if cache is not None else None
        if doc_ids is not None and state is None:
            y, state = self._run_last_documents(x, doc_ids)
        else:
            y, state = self.lstm(x, state)  # (B, T, d)
        if cache is not None:
            cache.state = state
        y = dropout(y, p, self.training)
        logits = self.head(y) if self.head is not None else F.linear(y, self.embed.weight)  # (B, T, V_padded)
        if labels is None:
            return logits[..., : self.cfg.vocab_size]
        return self.loss(logits, labels)

    def _run_last_documents(self, x: torch.Tensor, doc_ids: torch.Tensor):
        """Run each row from its last document's first token: x (B, T, d) -> (B, T, d), (h, c).

        The rows are shifted left by their padding, run as a packed batch of their real
        lengths (``pack_padded_sequence``: the final state is each row's own), and shifted back.
        """
        B, T, _ = x.shape
        lengths = (doc_ids == doc_ids[:, -1:]).sum(1)  # (B,) tokens of the last document
        skip = (T - lengths)[:, None]  # (B, 1)
        slots = torch.arange(T, device=x.device)[None]  # (1, T)
        left = ((slots + skip) % T)[..., None].expand_as(x)  # row b's real tokens first
        packed = nn.utils.rnn.pack_padded_sequence(
            x.gather(1, left), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        y, state = self.lstm(packed)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=T)  # (B, T, d)
        back = ((slots - skip) % T)[..., None].expand_as(y)
        return y.gather(1, back), state
