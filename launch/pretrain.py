"""Pretrain a megalm model.

    python launch/pretrain.py --config configs/tiny.yaml [section.key=value ...]

Works the same under ``torchrun``, ``deepspeed`` (accepts ``--local_rank``) and
plain ``python`` (a world of one). Exit codes:

====  =======================================================================
0     trained to ``training.max_steps``
2     one ``error:`` line: bad config or data, ``run.dir`` in use / not writable /
      full, or a step the health policy stops on (the last checkpoint is finite)
1     one ``error:`` line: a collective failed (a rank died or hung), naming it
75    preempted (``preempt.exit_code``): saved, run again to continue
====  =======================================================================
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from megalm.cli import add_config_args, bad_input  # noqa: E402
from megalm.config import ConfigError, load_config  # noqa: E402
from megalm.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pretrain a megalm model.")
    add_config_args(p)
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; LOCAL_RANK is used instead",
    )
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from megalm.train import CollectiveError, pretrain

        try:
            pretrain(cfg)
        except CollectiveError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as e:
        return bad_input(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
