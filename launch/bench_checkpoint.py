"""Benchmark: training-loop blocking time of an asynchronous vs a synchronous checkpoint save.

    python launch/bench_checkpoint.py --config configs/tiny.yaml [--repeats 3] [--out DIR] [key=value ...]

Prints a table and writes ``<out>/bench_checkpoint.json``. Goal: async blocked <= 20% of sync.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import add_config_args, bad_input, bench_parser, write_report  # noqa: E402
from megalm.config import ConfigError, load_config  # noqa: E402
from megalm.data import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    add_config_args(p)
    p.add_argument("--repeats", type=int, default=3, help="saves per mode (median reported)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, "training.resume=never"])
        from megalm.train.bench_checkpoint import measure_saves

        r = measure_saves(cfg, args.repeats)
    except (ConfigError, DataError) as e:
        return bad_input(e)
    med = r["median_s"]
    print(
        f"\ncheckpoint save: {r['model']}, {r['params'] / 1e6:.1f}M parameters, "
        f"{r['tag_bytes'] / 2**20:.0f} MiB per tag, median of {r['repeats']}"
    )
    print(f"{'mode':<8} {'blocked (s)':>12} {'published (s)':>14}")
    print(f"{'sync':<8} {med['sync_blocked']:>12.3f} {med['sync_blocked']:>14.3f}")
    print(f"{'async':<8} {med['async_blocked']:>12.3f} {med['async_published']:>14.3f}")
    print(f"ratio async / sync blocked = {r['ratio_async_over_sync']:.3f} (goal <= 0.20)")
    write_report(args.out, "bench_checkpoint.json", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
