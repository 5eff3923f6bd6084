"""Pretrain a megalm model.

    python launch/pretrain.py --config configs/tiny.yaml [section.key=value ...]

Works the same under ``torchrun``, ``deepspeed`` (accepts ``--local_rank``) and
plain ``python`` (a world of one). Bad input ends with one ``error:`` line and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megalm.config import ConfigError, load_config  # noqa: E402
from megalm.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pretrain a megalm model.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; LOCAL_RANK is used instead",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from megalm.train import pretrain

        pretrain(cfg)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
