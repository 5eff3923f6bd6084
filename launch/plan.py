"""Layout planner: the best TP x PP x DP x ZeRO x micro-batch x recompute layouts for a model.

    python launch/plan.py --model configs/model/gpt3-175b.yaml --devices 1024 --device a100 \
        [--seq-len 2048] [--global-batch 1536] [--top 10] [--recipe megalm|paper]

``--model`` takes a preset (``configs/model/*.yaml``) or any full config (its
``model`` section is used). Prints the fastest layouts that fit in memory, with the
predicted memory per device and step time, then why every other layout was rejected
(out of memory with the numbers, or a layout rule). Nothing is run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import bad_input  # noqa: E402
from megalm.config import ConfigError, load_config  # noqa: E402
from megalm.perf.devices import DEVICES  # noqa: E402
from megalm.perf.flops import param_count  # noqa: E402
from megalm.perf.memory import Recipe  # noqa: E402
from megalm.perf.plan import format_plan, plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model preset or full config YAML")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--device", default="h100", choices=sorted(DEVICES))
    p.add_argument("--seq-len", type=int, default=0, help="default: the preset's model.seq_len")
    p.add_argument("--global-batch", type=int, default=0, help="sequences per step; default 2 x devices")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--recipe", default="megalm", choices=["megalm", "paper"],
                   help="activation accounting: megalm's model (flash attention, fused norms) or "
                        "Korthikanti et al.'s GPT (materialized softmax, dropout)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.model).model
        if args.devices < 1:
            raise ConfigError("--devices must be >= 1")
    except ConfigError as e:
        return bad_input(e)
    import dataclasses

    if args.seq_len:
        cfg = dataclasses.replace(cfg, seq_len=args.seq_len)
    gb = args.global_batch or 2 * args.devices
    recipe = Recipe.paper() if args.recipe == "paper" else None
    print(
        f"model {args.model}: {cfg.family} L={cfg.n_layers} d={cfg.d_model} heads={cfg.n_heads}/"
        f"{cfg.kv_heads} T={cfg.seq_len} V={cfg.vocab_size}, "
        f"{param_count(cfg) / 1e9:.2f}B parameters; {args.devices} x {args.device}, global batch {gb}"
    )
    result = plan(cfg, args.devices, DEVICES[args.device], gb, recipe=recipe)
    print(format_plan(result, args.top))
    if not result.fits:
        print("no layout fits: add devices, lower the global batch or sequence length")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
