"""Benchmark: generation tokens/s with the KV cache vs the no-cache loop (same process, alternating).

    python launch/bench_generate.py [--config configs/tiny.yaml] [--new-tokens 256] [--prompt-tokens 32]
        [--batch 1] [--repeats 3] [--families llama gpt2 lstm] [--out runs/bench] [key=value ...]

The model is the config's shape with random weights (``model.vocab_size`` 0 means 4096,
the embedded corpus's tokenizer) and ``seq_len`` at least twice the new tokens. Prints a
table and writes ``<out>/bench_generate.json``. Goal: cache >= 5x the no-cache loop on CPU.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import add_config_args, bad_input, bench_parser, write_report  # noqa: E402
from megalm.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    add_config_args(p, default=str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"))
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--families", nargs="+", default=["llama", "gpt2", "lstm"])
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return bad_input(e)
    import torch

    from megalm.perf.generation import bench_models, measure, table

    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 4096)
    rows = [
        measure(m, args.batch, args.prompt_tokens, args.new_tokens, args.repeats)
        for m in bench_models(model, args.families, args.new_tokens)
    ]
    print(
        f"\ngeneration benchmark: greedy, fp32 on CPU x {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(table(rows))
    record = {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    write_report(args.out, "bench_generate.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
