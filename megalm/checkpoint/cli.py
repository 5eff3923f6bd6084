"""``python -m megalm.checkpoint inspect|export|import``: read a checkpoint without training.

- ``inspect PATH [--config X.yaml [key=value ...]]``: layout, step, tokens seen, sizes,
  verification status, and the config keys that differ from ``X.yaml`` (exit 1 when a
  file does not match the manifest).
- ``export --checkpoint PATH --out DIR [--format hf|torch]``: the model as a Hugging Face
  directory (``megalm.checkpoint.hf.export_hf``) or as one fp32 ``pytorch_model.bin``
  state dict of :class:`megalm.model.GPT` at tp = 1 (what DeepSpeed's ``zero_to_fp32.py``
  gave), from a tag saved at any layout and ZeRO stage.
- ``import --hf DIR --out RUN_DIR``: an HF directory as tag ``step_00000000`` of
  ``RUN_DIR/checkpoints`` (weights only; AdamW, schedule and data start afresh), which
  ``training.resume=auto`` (with ``run.dir=RUN_DIR``) or ``training.resume=PATH`` continues.

``PATH`` is a tag directory, a ``checkpoints`` directory or its ``latest`` file, or a run
directory. Bad input: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from megalm.checkpoint.manifest import COMPLETE, MANIFEST, CheckpointError, tag_bytes, verify_tag
from megalm.checkpoint.writer import LATEST, publish, tag_for, write_rank_files
from megalm.cli import bad_input


def resolve_tag(path: str | Path) -> Path:
    """The tag directory ``path`` names (a tag, ``checkpoints/``, ``checkpoints/latest`` or a run dir)."""
    p = Path(path)
    if p.is_file() and p.name == LATEST:
        p = p.parent / p.read_text().strip()
    elif (p / "checkpoints" / LATEST).is_file():
        p = p / "checkpoints" / (p / "checkpoints" / LATEST).read_text().strip()
    elif (p / LATEST).is_file():
        p = p / (p / LATEST).read_text().strip()
    if not (p / MANIFEST).is_file() and not (p / COMPLETE).is_file():
        raise CheckpointError(
            f"'{path}' is not a megalm checkpoint (no {MANIFEST}); pass a tag directory such as "
            "RUN/checkpoints/step_00000100, RUN/checkpoints/latest or the run directory"
        )
    return p


def _meta(tag: Path) -> dict[str, Any]:
    from megalm.train.checkpoint import read_meta

    return read_meta(tag)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every config key whose value differs."""
    a, b = _flat(saved), _flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def inspect(path: str, config: str | None, overrides: list[str]) -> int:
    """Print what tag ``path`` holds; 1 if it does not verify."""
    tag = resolve_tag(path)
    problem = verify_tag(tag)
    meta = _meta(tag)
    lay, m = meta.get("layout") or {}, meta["config"]["model"]
    sizes = tag_bytes(tag)
    print(f"checkpoint  {tag}{'' if (tag / COMPLETE).is_file() else ' (no COMPLETE marker)'}")
    tokens, adam = meta.get("tokens", 0), meta.get("optimizer_step")
    print(f"step        {meta['step']} (tokens seen {tokens:,}; AdamW step {adam})")
    print(
        f"layout      tp={lay.get('tp')} pp={lay.get('pp')} dp={lay.get('dp')} zero={lay.get('zero')} "
        f"({meta.get('world_size', 1)} ranks; loads onto any layout)"
    )
    print(
        f"model       {m['family']}, {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads "
        f"({m['n_kv_heads'] or m['n_heads']} kv), vocab {m['vocab_size']}, seq_len {m['seq_len']}"
    )
    parts = ", ".join(f"{k} {_size(v)}" for k, v in sorted(sizes.items()))
    print(f"files       {parts} ({_size(sum(sizes.values()))} in total)")
    print(f"verified    {'yes: every file matches ' + MANIFEST if problem is None else 'NO: ' + problem}")
    if config is not None:
        from megalm.config import load_config, to_dict

        diff = config_diff(meta["config"], to_dict(load_config(config, overrides)))
        print(
            f"config      {len(diff)} keys differ from {config} (saved -> current)"
            if diff
            else "config      same"
        )
        for line in diff:
            print(f"  {line}")
    return 0 if problem is None else 1


def _tokenizer(tag: Path, meta: dict[str, Any], given: str | None) -> Path:
    if given:
        return Path(given)
    if (tag / "tokenizer.json").is_file():
        return tag / "tokenizer.json"
    from megalm.data import load_manifest

    try:
        return Path(load_manifest(meta["config"]["data"]["dir"]).tokenizer_file)
    except Exception as e:
        raise CheckpointError(
            f"cannot find the tokenizer of '{tag}' ({e}); pass it with --tokenizer PATH/tokenizer.json"
        ) from None


def export(checkpoint: str, out: str, fmt: str, tokenizer: str | None) -> int:
    """Write the model of a verified tag as an HF directory or a torch state dict."""
    import torch

    from megalm.checkpoint.tensors import load_full_state_dict, resize_rows
    from megalm.config import ModelConfig

    tag = resolve_tag(checkpoint)
    problem = verify_tag(tag)
    if problem is not None:
        raise CheckpointError(f"{problem}; export another tag")
    meta = _meta(tag)
    model_cfg = ModelConfig(**meta["config"]["model"])
    state = load_full_state_dict(tag)
    out_dir = Path(out)
    if fmt == "torch":
        from megalm.train.model_shape import expected_tensors

        for name, (shape, vdim) in expected_tensors(model_cfg).items():
            if vdim is not None:  # the padding of an unsharded GPT (tp = 1)
                state[name] = resize_rows(state[name], shape[vdim])
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, out_dir / "pytorch_model.bin")
        print(f"exported {tag} (step {meta['step']}) to {out_dir / 'pytorch_model.bin'}")
        return 0
    from megalm.checkpoint.hf import export_hf

    export_hf(state, model_cfg, _tokenizer(tag, meta, tokenizer), out_dir)
    print(f"exported {tag} (step {meta['step']}) to {out_dir}")
    return 0


def import_(hf_dir: str, out: str) -> int:
    """Write HF directory ``hf_dir`` as tag ``step_00000000`` of ``out/checkpoints``."""
    import dataclasses

    from megalm.checkpoint.hf import import_hf
    from megalm.checkpoint.tensors import MODEL, full_box, pieces_bytes, shard_file
    from megalm.config import ModelConfig
    from megalm.train.model_shape import expected_tensors

    model_cfg, state, tok = import_hf(hf_dir, tp=1)
    want = expected_tensors(model_cfg)
    pieces = {
        name: (t.float(), full_box(tuple(t.shape)), tuple(t.shape), want[name][1])
        for name, t in state.items()
    }
    tag = Path(out) / "checkpoints" / tag_for(0)
    if tag.exists():
        raise CheckpointError(f"'{tag}' already exists; import into a new run directory")
    meta = {
        "step": 0,
        "tokens": 0,
        "optimizer_step": 0,
        "scheduler": None,
        "engine": {},
        "data": None,
        "world_size": 1,
        "layout": {"tp": 1, "pp": 1, "dp": 1, "zero": 0},
        "config": {"model": dataclasses.asdict(model_cfg)},
        "imported_from": str(Path(hf_dir).resolve()),
    }
    files = {
        shard_file(MODEL, 0, 0, 0): lambda: pieces_bytes(pieces),
        "meta.json": lambda: json.dumps(meta, indent=1).encode(),
    }
    if tok is not None:
        files["tokenizer.json"] = lambda: Path(tok).read_bytes()
    write_rank_files(tag, 0, files)
    publish(tag, 1, keep=0, timeout_s=60)
    default, shape = ModelConfig(), ("family", "vocab_size", "n_layers", "d_model", "n_heads")
    overrides = " ".join(
        f"model.{k}={v}"
        for k, v in dataclasses.asdict(model_cfg).items()
        if v is not None and (k in shape or v != getattr(default, k))
    )
    print(f"imported {hf_dir} as {tag}")
    print(f"continue pretraining with: {overrides} run.dir={out} training.resume=auto")
    if tok is not None:
        print(f"tokenize your data with {tag / 'tokenizer.json'} (data_tools.preprocess --tokenizer)")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megalm.checkpoint", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="layout, step, sizes, verification, config diff")
    i.add_argument("path")
    i.add_argument(
        "--config",
        nargs="+",
        metavar="ARG",
        help="compare with this YAML config and section.key=value overrides",
    )
    e = sub.add_parser("export", help="a tag -> Hugging Face directory (or torch state dict)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--format", choices=("hf", "torch"), default="hf")
    e.add_argument("--tokenizer", help="tokenizer.json (default: the tag's, or its data manifest's)")
    m = sub.add_parser("import", help="a Hugging Face directory -> tag step_00000000 of RUN_DIR")
    m.add_argument("--hf", required=True, help="local directory written by save_pretrained")
    m.add_argument("--out", required=True, help="run directory to create the checkpoint in")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megalm.config import ConfigError

    try:
        if args.command == "inspect":
            config = args.config or [None]
            return inspect(args.path, config[0], config[1:])
        if args.command == "export":
            return export(args.checkpoint, args.out, args.format, args.tokenizer)
        return import_(args.hf, args.out)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return bad_input(e)


if __name__ == "__main__":
    sys.exit(main())
