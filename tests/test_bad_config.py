"""Bad configs are one ``error:`` line and exit 2 from ``launch/pretrain.py``, before any
process group starts (and before the data is opened: ``data.dir`` here does not exist).

Every case runs ``main(argv)`` of ``launch/pretrain.py`` in this process (the same code as
the command line, without paying a Python start per case); one case runs the real
command line to pin the process's exit code and stderr.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch.distributed as dist

from tests.conftest import ROOT
from tests.launching import CONFIG, run_pretrain

spec = importlib.util.spec_from_file_location("pretrain_cli", ROOT / "launch" / "pretrain.py")
pretrain_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pretrain_cli)

CASES = {
    "training.micro_batch=0": "training.micro_batch must be > 0, got 0",
    "model.n_heads=0": "model.n_heads must be > 0, got 0",
    "model.seq_len=0": "model.seq_len must be > 0, got 0",
    "model.d_model=0": "model.d_model must be > 0, got 0",
    "model.dropout=1.0": "model.dropout must be in [0, 1), got 1.0",
    "model.dropout=-0.1": "model.dropout must be in [0, 1), got -0.1",
    "model.n_heads=5": "model.d_model (192) must be divisible by model.n_heads (5)",
    "model.n_kv_heads=4": "model.n_heads (6) must be divisible by model.n_kv_heads (4)",
    "training.log_interval=0": "training.log_interval must be > 0, got 0",
    "training.eval_interval=0": "training.eval_interval must be > 0, got 0",
    "training.save_interval=0": "training.save_interval must be > 0, got 0",
    "training.recompute_interval=0": "training.recompute_interval must be > 0, got 0",
    "training.max_skipped_steps=-1": "training.max_skipped_steps must be >= 0, got -1",
    "training.spike_factor=1.0": "training.spike_factor must be 0 (off) or > 1, got 1.0",
    "training.spike_window=0": "training.spike_window must be > 0, got 0",
    "training.on_nonfinite=ignore": "training.on_nonfinite",
    "training.on_spike=retry": "training.on_spike",
    "dist.straggler_factor=0.5": "dist.straggler_factor must be 0 (off) or > 1, got 0.5",
    "training.compile=true zero.stage=3": "training.compile=true with zero.stage=3: ZeRO-3 gathers",
}


@pytest.mark.parametrize("override", list(CASES))
def test_bad_value_is_one_error_line_before_any_process_group(override, tmp_path, capsys):
    code = pretrain_cli.main(
        ["--config", CONFIG, f"run.dir={tmp_path / 'run'}", "data.dir=/nonexistent", *override.split()]
    )
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert CASES[override] in lines[0]
    assert not dist.is_initialized() and "dist   |" not in out
    assert not (tmp_path / "run").exists()  # nothing written
    print(f"{override}: {lines[0]}")


def test_the_command_line_exits_2_with_that_line(tmp_path):
    proc = run_pretrain([f"run.dir={tmp_path}", "model.d_model=0"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: model.d_model must be > 0, got 0"
