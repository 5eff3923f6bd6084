"""Benchmark: activation checkpointing (full recompute) vs none on CPU, side by side.

    python launch/bench_recompute.py [--layers 8] [--d-model 256] [--seq 256] [--batch 8] [--out runs/bench]

Memory is the bytes autograd keeps for the backward of one forward
(:func:`megalm.perf.measure.saved_activation_bytes`: saved tensors, parameters
excluded; exact, not sampled), taken once per variant in the untimed first round;
time is the median forward+backward step without the counting hooks, the two
variants alternating in one process. Expected (Chen et al. 2016; Korthikanti et al.
2022): saved activations fall to about one block input per ``interval`` blocks,
time rises by about one extra forward (~+33%).
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import bench_parser, write_report  # noqa: E402
from megalm.config import ModelConfig  # noqa: E402
from megalm.model import GPT  # noqa: E402
from megalm.perf.measure import alternate, saved_activation_bytes  # noqa: E402


def step(model: GPT, x: torch.Tensor, interval: int, i: int) -> tuple[int, float]:
    """Round ``i`` with full recompute every ``interval`` blocks (0: none): (the bytes saved for
    backward, counted in round 0 only, else 0; seconds for forward + backward)."""
    model.set_recompute(interval)
    t0 = time.perf_counter()
    with saved_activation_bytes(model, enabled=i == 0) as saved:
        loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return saved["bytes"], seconds


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    cfg = ModelConfig(
        vocab_size=4096,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.d_model // 64,
        seq_len=args.seq,
    )
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    intervals = {"none": 0, "full": args.interval}
    saved, seconds = alternate(  # the first round measures memory and is not timed
        {k: functools.partial(step, model, x, n) for k, n in intervals.items()},
        timed=args.steps,
        warmup=1,
    )
    row = {k: {"saved_mb": saved[k][0] / 2**20, "step_s": statistics.median(seconds[k])} for k in intervals}
    mem_ratio = row["full"]["saved_mb"] / row["none"]["saved_mb"]
    time_ratio = row["full"]["step_s"] / row["none"]["step_s"]
    print(
        f"activation checkpointing: L={args.layers} d={args.d_model} T={args.seq} B={args.batch} "
        f"interval={args.interval}, {torch.get_num_threads()} threads, median of {args.steps}"
    )
    print(f"{'recompute':<10} {'saved MB':>9} {'fwd+bwd s':>10}")
    for k, v in row.items():
        print(f"{k:<10} {v['saved_mb']:>9.1f} {v['step_s']:>10.3f}")
    print(f"full / none: memory x{mem_ratio:.3f}, time x{time_ratio:.3f}")
    out = {
        "config": vars(args) | {"out": str(args.out)},
        "results": row,
        "memory_ratio": mem_ratio,
        "time_ratio": time_ratio,
    }
    write_report(args.out, "recompute.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
