"""Throughput sweep: tokens/s/device, TFLOP/s, MFU, HFU, memory and step-time parts per configuration.

    python launch/benchmark.py --config configs/tiny.yaml --out runs/bench \
        --sweep training.micro_batch=1,2 parallel.tp=1,2 [--zip] [--model configs/model/gpt3-125m.yaml] \
        [--dp 1 | --nproc N] [--launcher auto|python|torchrun|deepspeed|srun] [--steps 5 --warmup 2] \
        [--set key=value ...]

Every configuration runs as its own job of ``megalm.perf.worker`` (one process:
python; several: torchrun by default), ``tp * cp * pp * dp`` processes. Warm-up steps are
excluded. Failing or out-of-memory configurations are recorded and the sweep goes on.
Writes ``<out>/results.csv``, ``results.json``, ``throughput.png``, ``step_time.png``
and one ``config_NNN/`` folder (result.json, log.txt) per configuration. Exit code 0
when every configuration ran, 1 when some failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalm.cli import bad_input  # noqa: E402
from megalm.config import ConfigError, load_config  # noqa: E402
from megalm.perf.flops import HW_FLOPS_FORMULA, MODEL_FLOPS_FORMULA  # noqa: E402
from megalm.perf.sweep import SweepSettings, format_table, parse_sweep, run_sweep, write_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="base YAML config")
    p.add_argument("--model", help="model preset (configs/model/*.yaml) replacing the model section")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sweep", nargs="*", default=[], help="key=v1,v2 ... (cartesian product)")
    p.add_argument("--zip", action="store_true", help="vary the --sweep keys together, not their product")
    p.add_argument("--set", nargs="*", default=[], dest="fixed", help="key=value overrides for every run")
    p.add_argument("--launcher", default="auto", choices=["auto", "python", "torchrun", "deepspeed", "srun"])
    p.add_argument("--dp", type=int, default=1, help="data-parallel degree (processes = tp * cp * pp * dp)")
    p.add_argument("--nproc", type=int, default=0, help="fixed process count (dp derived); 0: tp*cp*pp*dp")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 2)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        config = args.config
        if args.model:
            from megalm.perf.presets import write_composed

            config = str(write_composed(args.config, args.model, args.out / "base_config.yaml"))
        load_config(config, args.fixed)  # fail fast on a typo, before launching anything
        combos = parse_sweep(args.sweep, args.zip) if args.sweep else [{}]
        keys = list(combos[0])
        load_config(config, [*args.fixed, *(f"{k}={v}" for k, v in combos[0].items())])  # key typos
        if args.warmup < 2:
            raise ConfigError("--warmup must be >= 2 (memory is measured during warm-up)")
    except ConfigError as e:
        return bad_input(e)
    s = SweepSettings(config, args.out.resolve(), args.launcher, args.dp, args.nproc, args.steps,
                      args.warmup, args.timeout)  # fmt: skip
    print(f"sweep | {config} | {args.launcher} | steps {args.steps} timed after {args.warmup} warm-up\n"
          f"MFU   | {MODEL_FLOPS_FORMULA}\nHFU   | {HW_FLOPS_FORMULA}", flush=True)  # fmt: skip
    rows = run_sweep(s, args.sweep, args.fixed, log=lambda m: print(m, flush=True), zipped=args.zip)
    print("\n" + format_table(rows, keys))
    peaks = {(r.get("peak_tflops"), r.get("peak_source")) for r in rows if r.get("status") == "ok"}
    for tflops, source in sorted(peaks, key=str):
        print(
            f"peak {tflops:.4f} TFLOP/s per device ({source}); "
            "MFU = tokens/s/device * model FLOPs/token / peak"
        )
    paths = write_outputs(rows, keys, s.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} configurations did not run (see the error column)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
