"""Golden curves: the absolute numbers of a fixed 20-step run, checked in and compared to.

A test that compares a run only with another run of the same code cannot see a
mistake both share (initialization, RoPE, the LR schedule, the data order, the
tokenizer). ``tests/golden/<family>.json`` pins, for ``llama`` and ``gpt2``:

- per step 1..20: ``loss``, ``grad_norm`` (global, before clipping) and ``lr``;
- the held-out loss at steps 0, 10 and 20 (``val_loss``);
- the config they were made with (:data:`GOLDEN_CONFIG`, resolved);
- the data: sha256 of the fixed corpus ``tests/data/corpus.jsonl``, of the tokenizer
  trained from it and of the shard manifest (:func:`build_golden_data`);
- ``made_with``: torch, DeepSpeed, tokenizers and Python versions and torch's CPU
  capability (the SIMD kernels torch picked), numbers stored as ``repr`` floats.

They are made by one process (``python launch/pretrain.py``, ZeRO-0, fp32, CPU):
``make golden`` (``python -m tests.golden``) or ``pytest --update-golden`` regenerates
both files and prints the diff; review it and commit it with the change that moved it.

API for test files::

    from tests.golden import ACROSS_LAYOUTS, SAME_ARITHMETIC, assert_matches_golden, golden_run_overrides

    def test_dp2(golden_data, tmp_path):              # golden_data: session fixture (tests/conftest.py)
        run_pretrain(golden_run_overrides(tmp_path, golden_data, "llama", **{"zero.stage": 1}), "torchrun", 2)
        assert_matches_golden(tmp_path, "llama")       # steps 1..20, losses rel 1e-5, grad norms 1e-4

- ``golden_run_overrides(run_dir, data_dir, family, **extra)``: the ``key=value``
  overrides of the golden run; ``extra`` may change the layout (``parallel.*``,
  ``zero.stage``, ``training.micro_batch``, recompute, intervals, ``training.max_steps``),
  never the numbers: :func:`assert_matches_golden` rejects a run whose model, optimizer,
  seeds, global batch or precision differ from the golden config.
- ``assert_matches_golden(run_dir, family, steps=range(1, 21), rel=ACROSS_LAYOUTS,
  grad_rel=None, grad_norm=True)``: the run's ``metrics.jsonl`` against the golden file:
  losses within ``rel``, grad norms within ``grad_rel`` (default :data:`GRAD_NORM`, or 0
  when ``rel`` is 0), ``lr`` exactly, and the held-out loss at every golden eval step in
  ``steps`` (and at step 0 when ``steps`` starts at 1) within ``rel``. ``rel=SAME_ARITHMETIC``
  (0.0) asks for bit equality: use it where the arithmetic is the same (one process,
  ZeRO-0, resumed or recomputed). ``grad_norm=False`` only where the product logs no norm
  (DeepSpeed's pipeline engine with ZeRO-0 in fp32, issue 11): norms that are logged are
  still compared, and so are the losses.

A golden file made with another torch, DeepSpeed or CPU capability fails every
comparison with a message naming both (never a silent pass, never an xfail, which CI
counts as a pass): numbers from another build are not the numbers pinned, and the
person who changed the build regenerates and reviews the diff in the same commit.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(__file__).resolve().parent
CORPUS = ROOT / "tests" / "data" / "corpus.jsonl"
FAMILIES = ("llama", "gpt2")
STEPS = range(1, 21)
VOCAB_SIZE = 512
SHARD_TOKENS = 30_000  # 4 train shards and 1 held-out shard from the ~320 KB corpus
VAL_FRACTION = 0.1

SAME_ARITHMETIC = 0.0  # bit-equal: same layout, resume, recompute
ACROSS_LAYOUTS = 1e-5  # relative, per step: float reassociation across TP/PP/DP/ZeRO
GRAD_NORM = 1e-4  # relative: DeepSpeed's fp32 partitioned norm vs megalm's fp64 sum

# The golden run, on configs/tiny.yaml. Four layers so pp=4 splits them; grad_clip below
# the gradient norm so every layout's clipping (and its global norm) changes the update.
GOLDEN_CONFIG: dict[str, object] = {
    **TINY,
    "model.n_layers": 4,
    "optim.grad_clip": 0.3,
    "precision.dtype": "fp32",
}
# Resolved config keys a run must share with the golden one (everything else is layout).
PINNED_SECTIONS = ("model", "optim")
PINNED_KEYS = ("run.seed", "data.seed", "data.blend", "training.global_batch", "precision.dtype")


def golden_path(family: str) -> Path:
    return GOLDEN_DIR / f"{family}.json"


def golden_run_overrides(run_dir: Path, data_dir: Path, family: str = "llama", **extra: object) -> list[str]:
    """``key=value`` overrides of the golden run of ``family`` writing to ``run_dir``.

    ``extra`` adds or replaces keys (a layout, fewer steps, recompute...).
    """
    if family not in FAMILIES:
        raise ValueError(f"no golden curve for family {family!r}; there are {FAMILIES}")
    base = {"run.dir": run_dir, "data.dir": data_dir, "model.family": family, **GOLDEN_CONFIG, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_golden_data(out: Path) -> Path:
    """Tokenizer (byte-level BPE, 512) and shards of the fixed corpus under ``out``; returns
    the shard directory (``data.dir``). Byte-identical on every run (see ``data`` in the
    golden files, checked by :func:`assert_matches_golden`)."""
    from data_tools.preprocess import preprocess
    from data_tools.train_tokenizer import train_tokenizer

    tokenizer = train_tokenizer([str(CORPUS)], VOCAB_SIZE, out / "tokenizer")
    shards = out / "shards"
    preprocess(
        [str(CORPUS)],
        tokenizer,
        shards,
        workers=1,
        shard_tokens=SHARD_TOKENS,
        val_fraction=VAL_FRACTION,
        progress=False,
    )
    return shards


def data_fingerprint(data_dir: Path) -> dict[str, str]:
    """sha256 of the corpus, of the tokenizer and of the manifest of a golden data dir."""
    return {
        "corpus_sha256": sha256(CORPUS),
        "tokenizer_sha256": sha256(Path(data_dir) / "tokenizer.json"),
        "manifest_sha256": sha256(Path(data_dir) / "manifest.json"),
    }


def made_with() -> dict[str, str]:
    """The versions and the CPU capability the numbers depend on (package metadata: reading
    DeepSpeed's version this way spares the test process a DeepSpeed import)."""
    import torch

    return {
        "torch": torch.__version__,
        "deepspeed": metadata.version("deepspeed"),
        "tokenizers": metadata.version("tokenizers"),
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


# What must match for the numbers to be comparable (the rest is recorded for the reader).
BUILD_KEYS = ("torch", "deepspeed", "cpu_capability")


@dataclass
class RunRecord:
    """What a run directory says: per-step records, held-out losses and the resolved config."""

    steps: dict[int, dict[str, Any]]  # step -> {"loss", "grad_norm", "lr"}
    val_loss: dict[int, float]
    config: dict[str, Any]


def read_run(run_dir: Path) -> RunRecord:
    """Rank 0's ``metrics.jsonl`` and ``config.yaml`` of ``run_dir``."""
    import yaml

    from megalm.train.metrics import read_metrics

    steps, val = {}, {}
    for r in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if "loss" in r:
            steps[r["step"]] = {"loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"]}
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return RunRecord(steps, val, config)


def pinned_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a resolved config that decide the numbers (flattened ``section.key``)."""
    out = {f"{s}.{k}": v for s in PINNED_SECTIONS for k, v in config[s].items()}
    for key in PINNED_KEYS:
        section, name = key.split(".")
        out[key] = config[section][name]
    return out


def golden_record(run_dir: Path, family: str) -> dict[str, Any]:
    """The golden file's content for the finished single-process run in ``run_dir``."""
    run = read_run(run_dir)
    missing = [s for s in STEPS if s not in run.steps or run.steps[s]["grad_norm"] is None]
    if missing or sorted(run.val_loss) != [0, 10, 20]:
        raise ValueError(
            f"{run_dir} is not a complete golden run (missing steps {missing}, val {sorted(run.val_loss)})"
        )
    return {
        "family": family,
        "made_with": made_with(),
        "data": data_fingerprint(Path(run.config["data"]["dir"])),
        "config": pinned_config(run.config),
        "steps": [{"step": s, **run.steps[s]} for s in STEPS],
        "val_loss": {str(s): v for s, v in sorted(run.val_loss.items())},
    }


def load_golden(family: str) -> dict[str, Any]:
    path = golden_path(family)
    if not path.is_file():
        pytest.fail(f"no golden curve {path}: run `make golden` and commit the files", pytrace=False)
    return json.loads(path.read_text())


def check_made_with(golden: dict[str, Any], family: str) -> None:
    """Fail, naming both, when the golden file was made with another torch/DeepSpeed/CPU capability."""
    ours = made_with()
    theirs = golden["made_with"]
    diff = [
        f"{k} {theirs.get(k)} (golden) vs {ours[k]} (here)" for k in BUILD_KEYS if theirs.get(k) != ours[k]
    ]
    if diff:
        pytest.fail(
            f"golden curve {golden_path(family).name} was made with another build: {'; '.join(diff)}. "
            "Its numbers do not pin this build: regenerate with `make golden`, review the printed diff "
            "and commit it with the version change",
            pytrace=False,
        )


def _config_problems(run: RunRecord, golden: dict[str, Any]) -> list[str]:
    ours = pinned_config(run.config)
    return [
        f"{key} is {ours.get(key)!r}, the golden run's is {value!r}"
        for key, value in golden["config"].items()
        if ours.get(key) != value
    ]


def _data_problems(run: RunRecord, golden: dict[str, Any]) -> list[str]:
    ours = data_fingerprint(Path(run.config["data"]["dir"]))
    return [
        f"data {k} {ours[k][:12]} differs from the golden {v[:12]} (tokenizers {made_with()['tokenizers']}, "
        f"golden made with {golden['made_with'].get('tokenizers')}): use the golden_data fixture"
        for k, v in golden["data"].items()
        if ours[k] != v
    ]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


def _compare(name: str, ours: float | None, gold: float, tol: float, step: int, worst: dict) -> str | None:
    if ours is None:
        return f"step {step}: the run logged no {name}"
    r = _rel(ours, gold)
    worst[name] = max(worst.get(name, 0.0), r)
    ok = ours == gold if tol == 0 else r <= tol
    if ok:
        return None
    return f"step {step}: {name} {ours!r} vs golden {gold!r} (relative {r:.2e} > {tol:.0e})"


def assert_matches_golden(
    run_dir: Path,
    family: str = "llama",
    steps: range = STEPS,
    rel: float = ACROSS_LAYOUTS,
    grad_rel: float | None = None,
    grad_norm: bool = True,
) -> None:
    """The run in ``run_dir`` reproduces the golden curve of ``family`` over ``steps``.

    Args:
        run_dir: a finished run directory (``metrics.jsonl``, ``config.yaml``).
        family: ``llama`` or ``gpt2``.
        steps: the optimizer steps to compare (a sub-range of 1..20).
        rel: relative tolerance of losses and held-out losses; 0 means bit-equal.
        grad_rel: relative tolerance of grad norms (default :data:`GRAD_NORM`, 0 when ``rel`` is 0).
        grad_norm: require a grad norm at every step (``False`` only where the product logs
            none; the norms a run does log are compared either way).
    """
    if not set(steps) <= set(STEPS) or not steps:
        raise ValueError(f"steps must be a non-empty sub-range of {STEPS}, got {steps}")
    golden = load_golden(family)
    check_made_with(golden, family)
    run = read_run(run_dir)
    problems = _config_problems(run, golden) + _data_problems(run, golden)
    if problems:
        pytest.fail(f"{run_dir} is not a golden {family} run: " + "; ".join(problems), pytrace=False)
    grad_rel = (0.0 if rel == 0 else GRAD_NORM) if grad_rel is None else grad_rel
    gold_steps = {r["step"]: r for r in golden["steps"]}
    worst: dict[str, float] = {}
    for s in steps:
        ours, gold = run.steps.get(s), gold_steps[s]
        if ours is None:
            problems.append(f"step {s}: the run logged no loss (keep training.log_interval=1)")
            continue
        problems.append(_compare("loss", ours["loss"], gold["loss"], rel, s, worst))
        if grad_norm or ours["grad_norm"] is not None:
            problems.append(_compare("grad_norm", ours["grad_norm"], gold["grad_norm"], grad_rel, s, worst))
        problems.append(_compare("lr", ours["lr"], gold["lr"], 0.0, s, worst))
    for s, gold in ((int(k), v) for k, v in golden["val_loss"].items()):
        if s in steps or (s == 0 and steps.start == 1):
            problems.append(_compare("val_loss", run.val_loss.get(s), gold, rel, s, worst))
    problems = [p for p in problems if p]
    summary = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    print(f"{run_dir} vs golden {family} steps {steps.start}-{steps.stop - 1}: max relative {summary}")
    if problems:
        pytest.fail(
            f"{run_dir} differs from the golden {family} curve ({len(problems)} problems):\n"
            + "\n".join(problems[:12]),
            pytrace=False,
        )
