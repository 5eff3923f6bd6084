"""Train a byte-level BPE tokenizer (HF ``tokenizers``) and save ``tokenizer.json``.

Byte-level BPE (Radford et al. 2019, section 2.2) never meets an unknown
character: the base alphabet is the 256 bytes. Special tokens: ``<|endoftext|>``
(EOS, separates documents) and ``<|pad|>``.

Usage: ``python -m data_tools.train_tokenizer --input PATH... --vocab-size N --output DIR``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.inputs import InputError, expand_inputs, read_documents

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(inputs: list[str], vocab_size: int, output: Path, text_key: str = "text") -> Path:
    """Train on the documents of ``inputs`` and write ``output/tokenizer.json``."""
    if vocab_size < 257 + 2:
        raise InputError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 259")
    files = expand_inputs(inputs)
    docs = list(read_documents(files, text_key))
    if not docs:
        raise InputError(f"the inputs {inputs} hold no non-empty documents; nothing to train on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    output.mkdir(parents=True, exist_ok=True)
    path = output / "tokenizer.json"
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file or a directory holding one (e.g. a local HF tokenizer)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise InputError(f"tokenizer '{path}' not found; train one with python -m data_tools.train_tokenizer")
    return Tokenizer.from_file(str(p))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--text-key", default="text", help="field holding the text in .jsonl inputs")
    args = p.parse_args(argv)
    try:
        path = train_tokenizer(args.input, args.vocab_size, args.output, args.text_key)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path} (vocab {load_tokenizer(path).get_vocab_size()})")


if __name__ == "__main__":
    main()
