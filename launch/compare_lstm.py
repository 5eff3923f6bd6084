"""The article's LSTM against the default Transformer: same data, tokens and schedule.

    python launch/compare_lstm.py [--config configs/tiny.yaml] [--out runs/compare-lstm] [--steps N]
    make compare-lstm

Trains ``--config`` (the Transformer) and ``model.family=lstm`` with 2 layers (the
article's model) through ``launch/pretrain.py``: the same shards, seed, global batch,
sequence length, steps and LR schedule, so both see the same tokens in the same order.
The LSTM's width is the one whose parameter count (:func:`megalm.perf.flops.param_count`)
is closest to the Transformer's. Writes ``OUT/compare.png`` (held-out loss against
tokens, both models), ``OUT/compare.json`` and prints a table; each run keeps its own
run directory under ``OUT`` (a second call resumes them, ``training.resume=auto``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from megalm.cli import add_config_args, bad_input, write_report  # noqa: E402
from megalm.config import ConfigError, ModelConfig, load_config  # noqa: E402
from megalm.data import DataError, load_manifest  # noqa: E402
from megalm.perf.flops import param_count  # noqa: E402
from megalm.train.metrics import read_metrics  # noqa: E402

LSTM_LAYERS = 2  # the article's model: embedding -> 2-layer LSTM -> linear


def match_width(transformer: ModelConfig, step: int = 24) -> ModelConfig:
    """The 2-layer LSTM config whose parameter count is closest to ``transformer``'s
    (widths in multiples of ``step``, so every head count of the config divides them)."""
    target = param_count(transformer)

    def lstm(d: int) -> ModelConfig:
        return dataclasses.replace(transformer, family="lstm", n_layers=LSTM_LAYERS, d_model=d)

    widths = range(step, 16 * transformer.d_model + step, step)
    return lstm(min(widths, key=lambda d: abs(param_count(lstm(d)) - target)))


def curve(run_dir: Path, tokens_per_step: int) -> list[tuple[int, float]]:
    """(tokens seen, held-out loss) of every evaluation in ``run_dir/metrics.jsonl``."""
    return [
        (r["step"] * tokens_per_step, r["val_loss"])
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "val_loss" in r
    ]


def tokens_per_second(run_dir: Path) -> float:
    """Median ``tokens_per_s`` over the run's logged steps."""
    rates = [r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r]
    return statistics.median(rates) if rates else 0.0


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One figure: held-out loss against tokens, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("LSTM vs Transformer, equal parameters and tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(config: str, run_dir: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", config]
    proc = subprocess.run([*cmd, f"run.dir={run_dir}", *overrides], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(ap, default=str(ROOT / "configs" / "tiny.yaml"))  # overrides: for both runs
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "compare-lstm")
    ap.add_argument("--steps", type=int, default=0, help="training steps of both (0: the config's)")
    args = ap.parse_args(argv)
    overrides = list(args.overrides) + ([f"training.max_steps={args.steps}"] if args.steps else [])
    cfg = load_config(args.config, overrides)
    vocab = cfg.model.vocab_size or load_manifest(cfg.data.dir, cfg.data).vocab_size
    transformer = dataclasses.replace(cfg.model, vocab_size=vocab)
    lstm = match_width(transformer)
    runs = {
        f"transformer ({transformer.family})": (transformer, []),
        "lstm": (
            lstm,
            ["model.family=lstm", f"model.n_layers={LSTM_LAYERS}", f"model.d_model={lstm.d_model}"],
        ),
    }
    tokens_per_step = cfg.training.global_batch * cfg.model.seq_len
    result, curves = {}, {}
    for name, (model, extra) in runs.items():
        run_dir = args.out / name.split()[0]
        train(args.config, run_dir, [*overrides, *extra])
        curves[name] = curve(run_dir, tokens_per_step)
        result[name] = {
            "params": param_count(model),
            "d_model": model.d_model,
            "n_layers": model.n_layers,
            "tokens": curves[name][-1][0],
            "final_val_loss": curves[name][-1][1],
            "tokens_per_s": tokens_per_second(run_dir),
            "curve": curves[name],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(curves, args.out / "compare.png")
    print(f"\n{'model':24} {'params':>10} {'tokens':>11} {'held-out loss':>14} {'tokens/s':>9}")
    for name, r in result.items():
        loss, rate = r["final_val_loss"], r["tokens_per_s"]
        print(f"{name:24} {r['params']:>10,} {r['tokens']:>11,} {loss:>14.4f} {rate:>9,.0f}")
    print(f"wrote {args.out / 'compare.png'}")
    write_report(args.out, "compare.json", result)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        sys.exit(bad_input(e))
