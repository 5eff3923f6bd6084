"""The golden curves themselves: the single-process run reproduces them bit for bit, the data
they were made from rebuilds byte-identically, and the checker fails on what it must catch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.golden import (
    FAMILIES,
    SAME_ARITHMETIC,
    assert_matches_golden,
    build_golden_data,
    check_made_with,
    data_fingerprint,
    load_golden,
)
from tests.host_reads import assert_host_reads, reads_dir

Failed = pytest.fail.Exception


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_single_process_run_reproduces_the_golden_curve_bitwise(golden_runs, family):
    """Losses, grad norms, lr of steps 1..20 and held-out losses at 0, 10, 20: bit-equal."""
    assert_matches_golden(golden_runs(family), family, rel=SAME_ARITHMETIC)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_run_reads_the_host_once_per_step_and_once_per_log_record(golden_runs, family):
    """The golden run (one process, log every step): one host read per step, the health verdict,
    plus one per log record (loss and grad norm together); tests/host_reads.py."""
    run = golden_runs(family)
    steps = len(load_golden(family)["steps"])
    assert_host_reads(reads_dir(run), ranks=1, steps=steps, log_records=steps)


def test_golden_data_is_byte_identical_run_to_run(golden_data, tmp_path):
    """Tokenizer training and preprocessing of the fixed corpus are deterministic, and give
    the data the golden files were made from."""
    again = build_golden_data(tmp_path)
    files = sorted(p.name for p in golden_data.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) and "tokenizer.json" in files
    for name in files:
        assert (golden_data / name).read_bytes() == (again / name).read_bytes(), name
    for family in FAMILIES:
        assert load_golden(family)["data"] == data_fingerprint(golden_data), family


def test_golden_files_pin_both_families_with_versions():
    for family in FAMILIES:
        g = load_golden(family)
        assert g["family"] == family and g["config"]["model.family"] == family
        assert [r["step"] for r in g["steps"]] == list(range(1, 21))
        assert sorted(map(int, g["val_loss"])) == [0, 10, 20]
        assert {"torch", "deepspeed", "cpu_capability"} <= g["made_with"].keys()
        assert all(isinstance(r[k], float) for r in g["steps"] for k in ("loss", "grad_norm", "lr"))
        assert g["val_loss"]["20"] < g["val_loss"]["0"] - 0.5  # the curve is of a model that learns


def test_version_mismatch_fails_naming_both_versions():
    golden = load_golden("llama")
    check_made_with(golden, "llama")  # the checked-in files match this build
    other = {**golden, "made_with": {**golden["made_with"], "torch": "2.99.0", "deepspeed": "9.9.9"}}
    with pytest.raises(Failed) as e:
        check_made_with(other, "llama")
    here = golden["made_with"]
    assert f"torch 2.99.0 (golden) vs {here['torch']} (here)" in str(e.value)
    assert f"deepspeed 9.9.9 (golden) vs {here['deepspeed']} (here)" in str(e.value)
    assert "make golden" in str(e.value)


def _copy_with(run_dir: Path, dest: Path, step: int, key: str, factor: float) -> Path:
    """A copy of a run directory whose ``key`` at ``step`` is multiplied by ``factor``."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    lines = []
    for line in (dest / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("step") == step and key in r:
            r[key] *= factor
        lines.append(json.dumps(r))
    (dest / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return dest


@pytest.mark.slow
def test_checker_fails_on_one_ulp_a_grad_norm_drift_and_another_config(golden_runs, tmp_path):
    run = golden_runs("llama")
    ulp = _copy_with(run, tmp_path / "ulp", 7, "loss", 1 + 2**-23)
    assert_matches_golden(ulp, "llama")  # within 1e-5 ...
    with pytest.raises(Failed, match=r"step 7: loss .* \(relative 1\.\d+e-07 > 0e\+00\)"):
        assert_matches_golden(ulp, "llama", rel=SAME_ARITHMETIC)  # ... but not bit-equal
    norm = _copy_with(run, tmp_path / "norm", 12, "grad_norm", 1 + 2e-4)
    with pytest.raises(Failed, match=r"step 12: grad_norm .* > 1e-04"):
        assert_matches_golden(norm, "llama")
    val = _copy_with(run, tmp_path / "val", 20, "val_loss", 1 + 1e-4)
    with pytest.raises(Failed, match=r"step 20: val_loss"):
        assert_matches_golden(val, "llama")
    with pytest.raises(Failed, match=r"model.family is 'llama', the golden run's is 'gpt2'"):
        assert_matches_golden(run, "gpt2")  # another family's curve
    shutil.copytree(run, tmp_path / "cfg", ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    cfg = tmp_path / "cfg" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("rope_theta: 10000.0", "rope_theta: 10001.0"))
    with pytest.raises(Failed, match=r"model.rope_theta is 10001.0, the golden run's is 10000.0"):
        assert_matches_golden(tmp_path / "cfg", "llama")
