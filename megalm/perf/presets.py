"""Model presets (``configs/model/*.yaml``, a ``model:`` section only) merged into a full config.

    python -m megalm.perf.presets --config configs/tiny.yaml --model configs/model/gpt3-125m.yaml \
        --out runs/gpt3-125m.yaml
    python launch/pretrain.py --config runs/gpt3-125m.yaml

The preset's ``model`` keys replace the base config's; every other section stays.
The result is validated like any config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from megalm.cli import bad_input
from megalm.config import ConfigError, load_config


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    tree = yaml.safe_load(p.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections")
    return tree


def compose(config: str | Path, model: str | Path) -> dict[str, Any]:
    """The base config's tree with its ``model`` section updated by the preset's.

    Raises:
        ConfigError: a missing file, a preset without a ``model`` section, or a merged
            config that does not validate (unknown key, wrong type).
    """
    base, preset = _read(config), _read(model)
    if set(preset) != {"model"}:
        raise ConfigError(f"model preset '{model}' must hold only a 'model:' section, got {sorted(preset)}")
    base["model"] = {**base.get("model", {}), **preset["model"]}
    return base


def write_composed(config: str | Path, model: str | Path, out: str | Path) -> Path:
    """Write the merged YAML to ``out`` after checking it loads; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(compose(config, model), sort_keys=False))
    load_config(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Merge a model preset into a full config.")
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        print(write_composed(args.config, args.model, args.out))
    except ConfigError as e:
        return bad_input(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
