"""Report: bytes communicated per transformer layer per step for TP and TP + SP.

    python launch/bench_tp_comm.py [--tp 2 4] [--batch 4] [--seq 256] [--hidden 512] [--out runs/bench]

Starts ``tp`` CPU processes (gloo) per degree, counts every collective of one
forward + backward, and prints the measured bytes next to the formula of
Korthikanti et al. 2022 (see ``megalm/perf/comm.py``). Writes JSON.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import bench_parser, write_report  # noqa: E402
from megalm.config import ModelConfig  # noqa: E402
from megalm.parallel import ParallelContext, ParallelDims  # noqa: E402
from megalm.perf.comm import analytic_layer_bytes, measure_layer_bytes  # noqa: E402


def _worker(rank: int, tp: int, port: int, cfg: ModelConfig, batch: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    ctx = ParallelContext(ParallelDims.from_world(tp, tp=tp))
    out = {sp: measure_layer_bytes(cfg, ctx.tp_group, sp, batch) for sp in (False, True)}
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def measure(tp: int, cfg: ModelConfig, batch: int) -> dict[bool, dict[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, tp, port, cfg, batch, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


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
