"""Report: bytes the attention ring sends per transformer layer per step, measured vs formula.

    python launch/bench_cp_comm.py [--cp 2 4] [--tp 1] [--batch 2] [--seq 512] [--hidden 256]
                                   [--heads 8] [--kv-heads 2] [--recompute] [--out runs/bench]

Starts ``tp x cp`` CPU processes (gloo) per degree, counts every point-to-point send of
the ring in one forward + backward (a 2-layer minus a 1-layer model), and prints the
measured bytes next to :func:`megalm.perf.cp.ring_bytes_per_layer` (formula in
``megalm/perf/cp.py``; fp32 on CPU). Writes ``cp_comm.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import bench_parser, write_report  # noqa: E402
from megalm.config import ModelConfig  # noqa: E402
from megalm.parallel import ParallelContext, ParallelDims  # noqa: E402
from megalm.perf.cp import measure_ring_bytes_per_layer, ring_bytes_per_layer  # noqa: E402
from megalm.train.launchers import run_local_ranks  # noqa: E402


def _rank_bytes(rank: int, world: int, tp: int, cfg: ModelConfig, args) -> dict[str, int]:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=tp, cp=world // tp))
    return measure_ring_bytes_per_layer(cfg, args.batch, ctx.cp_group, ctx.tp_group, tp > 1, args.recompute)


def measure(tp: int, cp: int, cfg: ModelConfig, args) -> list[dict[str, int]]:
    """Every rank's counted bytes per layer (they must all be equal: the ring is balanced)."""
    return run_local_ranks(tp * cp, _rank_bytes, tp, cfg, args, timeout=900, start_method="spawn")


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--recompute", action="store_true", help="full activation checkpointing of each block")
    args = p.parse_args(argv)
    cfg = ModelConfig(
        vocab_size=512, n_layers=1, d_model=args.hidden, n_heads=args.heads, n_kv_heads=args.kv_heads,
        seq_len=args.seq, kernels="torch",
    )  # fmt: skip
    recompute = "full" if args.recompute else "none"
    print(
        f"ring bytes sent per rank per layer per step (fp32, b={args.batch} s={args.seq} h={args.hidden} "
        f"kv heads={args.kv_heads} hs={cfg.head_size} tp={args.tp} recompute={recompute})"
    )
    print(f"{'cp':>3} {'measured':>12} {'formula':>12} {'ratio':>6}  by kind (measured)")
    rows = []
    for cp in args.cp:
        per_rank = measure(args.tp, cp, cfg, args)
        formula = ring_bytes_per_layer(cfg, args.batch, cp, args.tp, dtype_bytes=4, recompute=recompute)
        m = per_rank[0]
        total_m, total_f = sum(m.values()), sum(formula.values())
        balanced = all(r == m for r in per_rank)
        rows.append({"cp": cp, "tp": args.tp, "measured": per_rank, "formula": formula, "balanced": balanced,
                     "ratio": total_m / total_f})  # fmt: skip
        note = "" if balanced else "  (ranks differ!)"
        print(f"{cp:>3} {total_m:>12,} {total_f:>12,} {total_m / total_f:>6.3f}  {m}{note}")
    write_report(args.out, "cp_comm.json", rows)
    return 0 if all(r["ratio"] == 1.0 and r["balanced"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
