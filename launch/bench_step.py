"""Benchmark: the trainer's training step (DeepSpeed engine) vs a bare PyTorch loop.

    python launch/bench_step.py --config configs/tiny.yaml [--steps 10] [--compile] [--out runs/bench]
                                [key=value ...]

``--compile`` adds the trainer's step with ``training.compile=true`` to the rotation and reports
compiled / eager tokens/s. Prints a table and writes ``<out>/bench_step.json``. Goal: ratio
megalm / bare <= 1.05.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import add_config_args, bad_input, bench_parser, write_report  # noqa: E402
from megalm.config import ConfigError, load_config  # noqa: E402
from megalm.data import DataError, load_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    add_config_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per path")
    p.add_argument("--compile", action="store_true", help="also time the step with training.compile=true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.model.vocab_size:
            vocab = load_manifest(cfg.data.dir).vocab_size
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    except (ConfigError, DataError) as e:
        return bad_input(e)
    from megalm.perf.step_compare import compare_step

    r = compare_step(cfg, args.steps, args.warmup, compiled=args.compile)
    print(
        f"\nstep benchmark: {r['model']} global batch {r['global_batch']} (micro {r['micro_batch']}), "
        f"zero {r['zero_stage']}, {r['device']} x {r['threads']} threads, median of {r['steps_timed']}"
    )
    print(f"{'path':<8} {'step (ms)':>10} {'tokens/s':>10} {'TFLOP/s':>9}")
    for k in r["median_step_s"]:
        ms, tps, tflops = r["median_step_s"][k] * 1e3, r["tokens_per_s"][k], r["tflops"][k]
        print(f"{k:<8} {ms:>10.1f} {tps:>10,.0f} {tflops:>9.4f}")
    print(
        f"ratio megalm / bare = {r['ratio_megalm_over_bare']:.3f} (goal <= 1.05); "
        f"max loss relative difference {r['max_loss_rel_diff']:.1e}"
    )
    if args.compile:
        print(
            f"ratio compiled / eager tokens/s = {r['ratio_compiled_over_eager']:.3f}; "
            f"max loss relative difference {r['max_loss_rel_diff_compiled']:.1e}"
        )
    write_report(args.out, "bench_step.json", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
