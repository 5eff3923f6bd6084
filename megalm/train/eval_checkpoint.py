"""``launch/evaluate.py``: loss, perplexity and bits per byte of a checkpoint on held-out text.

    python launch/evaluate.py --checkpoint RUN/checkpoints/latest [--data SHARDS|TEXT...] [key=value ...]

Data: by default the run's own held-out split and the very windows the trainer's
``val_loss`` used (the first ``training.eval_batches * training.global_batch``),
so the two numbers agree; ``--data`` takes a shard directory (its ``--split``,
built with the run's tokenizer) or raw text files (``.txt``, ``.jsonl[.gz|.zst]``,
``.parquet``, tokenized here with the run's tokenizer), evaluated whole
(``--windows`` caps it). Documents are packed into windows of ``seq_len + 1``
tokens exactly as for training.

Numbers (over the N evaluated label tokens, which encode ``bytes`` bytes of text):

* loss: mean next-token cross entropy in nats (the trainer's ``val_loss``);
* perplexity: ``exp(loss)``;
* bits per byte: ``N * loss / (ln 2 * bytes)``, the tokenizer-independent measure
  of The Pile (Gao et al. 2020, section 4); EOS separators count 0 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megalm.data import PackedWindows, eval_batches, load_manifest, open_split
from megalm.data.build import check_tokenizer
from megalm.data.shards import DataError
from megalm.train.inference import Loaded, open_checkpoint

OVERRIDE = re.compile(r"[a-z_]+\.[a-z_0-9.]+=.*")


@dataclass
class EvalResult:
    """What one evaluation measured (the JSON record)."""

    checkpoint: str
    step: int
    data: str
    windows: int
    tokens: int
    bytes: int
    loss: float
    perplexity: float
    bits_per_byte: float
    layout: dict

    def table(self) -> str:
        rows = [
            ("checkpoint", f"{self.checkpoint} (step {self.step})"),
            ("data", self.data),
            ("layout", " ".join(f"{k}={v}" for k, v in self.layout.items())),
            ("windows", f"{self.windows}"),
            ("tokens evaluated", f"{self.tokens:,}"),
            ("bytes of text", f"{self.bytes:,}"),
            ("loss (nats/token)", f"{self.loss:.6f}"),
            ("perplexity", f"{self.perplexity:.3f}"),
            ("bits per byte", f"{self.bits_per_byte:.4f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}} | {v}" for k, v in rows)


def token_bytes(tokenizer_file: Path) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for (V,), special tokens 0.

    Byte-level BPE (``data_tools.train_tokenizer``) writes every byte as one character
    of its token string (Radford et al. 2019, section 2.2), so a token's bytes are its
    string's length; other tokenizers: the length of the token decoded alone.
    """
    from tokenizers import Tokenizer, decoders

    tok = Tokenizer.from_file(str(tokenizer_file))
    special = set(tok.get_added_tokens_decoder())
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    out = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i not in special:
            out[i] = len(text) if byte_level else len(tok.decode([i]).encode("utf-8"))
    return out


def text_windows(paths: list[str], tokenizer_file: Path, seq_len: int, eos_id: int) -> PackedWindows:
    """Raw text files tokenized with the run's tokenizer, packed like training data."""
    from tokenizers import Tokenizer

    from data_tools.inputs import InputError, expand_inputs, read_documents

    tok = Tokenizer.from_file(str(tokenizer_file))
    try:
        texts = list(read_documents(expand_inputs(paths)))
    except InputError as e:
        raise DataError(str(e)) from None
    docs = [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(texts, add_special_tokens=False)]
    windows = PackedWindows(docs, seq_len, eos_id) if docs else None
    if windows is None or len(windows) == 0:
        total = sum(len(d) + 1 for d in docs)
        raise DataError(
            f"--data {' '.join(paths)} holds {total} tokens, fewer than one window of model.seq_len + 1 = "
            f"{seq_len + 1}; pass more text"
        )
    return windows


def open_windows(loaded: Loaded, data: list[str], split: str) -> tuple[PackedWindows, str]:
    """The windows to evaluate and how to name them: the run's ``split`` of ``data.dir``, a
    shard directory's ``split`` (same tokenizer), or raw text files."""
    cfg, manifest, seq = loaded.cfg, loaded.manifest, loaded.cfg.model.seq_len
    if not data or (len(data) == 1 and (Path(data[0]) / "manifest.json").is_file()):
        where = data[0] if data else cfg.data.dir
        m = load_manifest(where, cfg.data) if data else manifest
        if data:
            check_tokenizer(m, where, manifest, cfg.data.dir, role="--data")
        windows = open_split(m, split, seq, cfg.data.on_bad_data, cfg.data.verify)
        if windows is None:
            raise DataError(f"'{where}' has no {split} window of {seq + 1} tokens; pass --split or --data")
        return windows, f"{where} ({split} split)"
    return text_windows(data, manifest.tokenizer_file, seq, manifest.eos_id), " ".join(data)


def window_count(loaded: Loaded, available: int, requested: int | None, default_run_windows: bool) -> int:
    """How many windows to evaluate: the trainer's count (run's own split, no ``--windows``), else
    ``requested`` or all of them, rounded down so every rank runs the same forward passes
    (a multiple of micro_batch x dp, of global_batch under pipeline parallelism)."""
    t, dp = loaded.cfg.training, loaded.ctx.dp
    if default_run_windows and requested is None:
        return t.eval_batches * t.global_batch  # exactly the trainer's Evaluator windows
    unit = t.global_batch if loaded.cfg.parallel.pp > 1 else t.micro_batch * dp
    n = min(requested or available, available) // unit * unit
    if n == 0:
        raise DataError(
            f"{available} windows of {loaded.cfg.model.seq_len + 1} tokens are fewer than one evaluation "
            f"step of {unit}; pass more text or lower training.micro_batch"
        )
    return n


def evaluate(loaded: Loaded, data: list[str], split: str = "val", windows: int | None = None) -> EvalResult:
    """Collective: evaluate ``loaded`` on ``data`` (see the module docstring)."""
    cfg, ctx = loaded.cfg, loaded.ctx
    packed, name = open_windows(loaded, data, split)
    n = window_count(loaded, len(packed), windows, not data)
    mb, ids = cfg.training.micro_batch, cfg.data.document_mask
    batches = eval_batches(packed, n, mb, ctx.dp_rank, ctx.dp, ids, ctx.cp_rank, ctx.cp)
    loss = loaded.strategy.eval_loss(batches)
    per_token = token_bytes(loaded.manifest.tokenizer_file)
    n_bytes = sum(int(per_token[packed.window(int(i))[1:]].sum()) for i in np.arange(n) % len(packed))
    tokens = n * cfg.model.seq_len
    layout = {"tp": ctx.tp, "pp": ctx.dims.pp, "dp": ctx.dp, "zero": cfg.zero.stage, "cp": ctx.cp}
    bpb = tokens * loss / (math.log(2) * n_bytes) if n_bytes else float("nan")
    return EvalResult(
        str(loaded.tag), loaded.step, name, n, tokens, n_bytes, loss, math.exp(loss), bpb, layout
    )


def split_overrides(paths: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--data a.txt parallel.tp=2`` puts the override into ``--data``'s list: move every
    ``section.key=value`` that is not an existing path back to the overrides."""
    is_override = [bool(OVERRIDE.fullmatch(x)) and not Path(x).exists() for x in paths]
    data = [x for x, o in zip(paths, is_override, strict=True) if not o]
    return data, [x for x, o in zip(paths, is_override, strict=True) if o] + overrides


def main(argv: list[str] | None = None) -> int:
    """The ``launch/evaluate.py`` command line (see the module docstring)."""
    p = argparse.ArgumentParser(description="Evaluate a megalm checkpoint: loss, perplexity, bits per byte.")
    p.add_argument(
        "--checkpoint", required=True, help="RUN, RUN/checkpoints, RUN/checkpoints/latest or a tag"
    )
    p.add_argument(
        "--data", nargs="+", default=[], help="a shard directory or raw text files (default: the run's)"
    )
    p.add_argument("--split", default="val", choices=["val", "train"], help="split of a shard directory")
    p.add_argument("--windows", type=int, default=None, help="evaluate at most this many windows")
    p.add_argument("--json", type=Path, default=None, help="output JSON (default: RUN/eval_<tag>.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2")
    args = p.parse_args(argv)
    data, overrides = split_overrides(args.data, args.overrides)
    loaded = open_checkpoint(args.checkpoint, overrides)
    result = evaluate(loaded, data, args.split, args.windows)
    if loaded.rank0:
        out = args.json or loaded.tag.parent.parent / f"eval_{loaded.tag.name}.json"
        out.write_text(json.dumps(asdict(result), indent=2) + "\n")
        print(result.table(), flush=True)
        print(f"wrote {out}", flush=True)
    dist.barrier()
    return 0
