"""Report: bytes communicated per transformer layer per step for TP and TP + SP.

    python launch/bench_tp_comm.py [--tp 2 4] [--batch 4] [--seq 256] [--hidden 512] [--out runs/bench]

Starts ``tp`` CPU processes (gloo) per degree, counts every collective of one
forward + backward, and prints the measured bytes next to the formula of
Korthikanti et al. 2022 (see ``megalm/perf/comm.py``). Writes JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import bench_parser, write_report  # noqa: E402
from megalm.config import ModelConfig  # noqa: E402
from megalm.parallel import ParallelContext, ParallelDims  # noqa: E402
from megalm.perf.comm import analytic_layer_bytes, measure_layer_bytes  # noqa: E402
from megalm.train.launchers import run_local_ranks  # noqa: E402


def _rank_bytes(rank: int, tp: int, cfg: ModelConfig, batch: int) -> dict[bool, dict[str, int]]:
    ctx = ParallelContext(ParallelDims.from_world(tp, tp=tp))
    return {sp: measure_layer_bytes(cfg, ctx.tp_group, sp, batch) for sp in (False, True)}


def measure(tp: int, cfg: ModelConfig, batch: int) -> dict[bool, dict[str, int]]:
    """Rank 0's counted bytes per layer, without and with sequence parallelism."""
    return run_local_ranks(tp, _rank_bytes, cfg, batch, timeout=600, start_method="spawn")[0]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args(argv)
    cfg = ModelConfig(vocab_size=1024, n_layers=1, d_model=args.hidden, n_heads=8, seq_len=args.seq)
    rows = []
    print(f"bytes sent per rank per layer per step (fp32, b={args.batch} s={args.seq} h={args.hidden})")
    print(f"{'tp':>3} {'sp':>3} {'measured':>12} {'formula':>12} {'ratio':>6}  by collective")
    for tp in args.tp:
        measured = measure(tp, cfg, args.batch)
        for sp in (False, True):
            m = measured[sp]
            f = analytic_layer_bytes(args.batch, args.seq, args.hidden, tp, sp)
            total_m, total_f = sum(m.values()), sum(f.values())
            rows.append({"tp": tp, "sp": sp, "measured": m, "formula": f, "ratio": total_m / total_f})
            ratio = total_m / total_f
            print(f"{tp:>3} {'on' if sp else 'off':>3} {total_m:>12,} {total_f:>12,} {ratio:>6.3f}  {m}")
    write_report(args.out, "tp_comm.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
