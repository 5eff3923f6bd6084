"""Verified checkpoints: every file type of a tag, a flipped byte and a truncation, named in
one line; ``resume=auto`` falls back to the previous tag (issue 15), ``resume_fallback=false``
and an explicit path make it an error; a different model shape is one ``error:`` line.

One trainer process (a real DeepSpeed engine) saves tags at steps 2 and 4; each case copies
the checkpoints, damages one file of the latest tag and resumes in that same process.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import shutil
import traceback
from pathlib import Path

import pytest

from tests.conftest import scaled_timeout, tiny_overrides
from tests.launching import run_pretrain

pytestmark = pytest.mark.slow

# (file type, a path glob inside the tag)
FILES = [
    ("model", "model_*.safetensors"),
    ("optim", "optim_*.safetensors"),
    ("meta", "meta.json"),
    ("rng", "rng/rank_*.pt"),
    ("manifest", "manifest.json"),
]
DAMAGE = ["flip", "truncate"]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[0 if path.suffix == ".json" else len(data) // 2] ^= 0x01  # '{' -> 'z': JSON that does not parse
    else:
        del data[len(data) // 2 :]
    path.write_bytes(bytes(data))


def _cases(run_dir: str, root: str, overrides: list[str], queue) -> None:
    """In a fresh process: one Trainer; resume from a damaged copy per case."""
    try:
        from megalm.checkpoint.manifest import CheckpointError
        from megalm.config import load_config
        from megalm.train.trainer import Trainer
        from tests.launching import CONFIG

        trainer = Trainer(load_config(CONFIG, overrides))
        checkpointer = trainer.checkpointer
        results = {}
        for kind, pattern in FILES:
            for how in DAMAGE:
                case = Path(root) / f"{kind}-{how}" / "checkpoints"
                shutil.copytree(Path(run_dir) / "checkpoints", case)
                target = sorted((case / "step_00000004").glob(pattern))[0]
                damage(target, how)
                checkpointer.dir = case
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    try:
                        step = checkpointer.resume()
                    except CheckpointError as e:
                        step = f"error: {e}"
                results[(kind, how)] = (step, str(target), out.getvalue())
        queue.put(("ok", results))
    except BaseException:
        queue.put(("error", traceback.format_exc()))


@pytest.fixture(scope="module")
def saved_run(shards_dir, tmp_path_factory) -> Path:
    """4 steps, tags at 2 and 4 (kept)."""
    run_dir = tmp_path_factory.mktemp("saved")
    over = {"training.max_steps": 4, "training.save_interval": 2, "training.keep_checkpoints": 3}
    proc = run_pretrain(tiny_overrides(run_dir, shards_dir, **over))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_each_damaged_file_is_named_and_auto_resume_falls_back(saved_run, shards_dir, tmp_path):
    overrides = tiny_overrides(tmp_path / "run", shards_dir, **{"training.max_steps": 4})
    # spawn, not fork: a fork of the pytest process (torch's and gloo's threads running) can
    # deadlock in the child; daemon, so a hung child cannot keep pytest from exiting.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cases, args=(str(saved_run), str(tmp_path), overrides, queue), daemon=True)
    proc.start()
    try:
        status, results = queue.get(timeout=scaled_timeout(600))
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", results
    for (kind, how), (step, target, out) in results.items():
        lines = [line for line in out.splitlines() if line.startswith("checkpoint | skipped")]
        assert step == 2, (kind, how, step, out)
        assert len(lines) == 1, out
        print(lines[0])
        assert lines[0].startswith("checkpoint | skipped step_00000004: ")
        assert lines[0].endswith("; resuming from step_00000002")
        if kind != "manifest" or how == "truncate":
            assert f"'{target}'" in lines[0]  # the damaged file is named
        if kind in ("model", "optim", "rng") and how == "truncate":
            assert "is truncated or overwritten" in lines[0]
        if kind in ("model", "optim", "rng") and how == "flip":
            assert "is corrupted (sha256 differs from the manifest)" in lines[0]
        assert "step_00000002 at step 2" in out


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_fallback_off_or_an_explicit_tag_makes_a_damaged_file_an_error(saved_run, shards_dir, tmp_path):
    shutil.copytree(saved_run / "checkpoints", tmp_path / "checkpoints")
    target = next((tmp_path / "checkpoints" / "step_00000004").glob("optim_*.safetensors"))
    damage(target, "truncate")
    line = _one_error_line(
        run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"training.resume_fallback": "false"}))
    )
    print(line)
    assert line.startswith(f"error: '{target}' is truncated or overwritten (")
    assert "training.resume_fallback=false: restore or remove step_00000004" in line
    explicit = tiny_overrides(tmp_path, shards_dir, **{"training.resume": target.parent})
    line = _one_error_line(run_pretrain(explicit))
    print(line)
    assert (
        line.startswith(f"error: '{target}' is truncated")
        and "pass another tag with training.resume=PATH" in line
    )


def test_resume_with_another_model_shape_is_one_line_naming_the_keys(saved_run, shards_dir, tmp_path):
    shutil.copytree(saved_run / "checkpoints", tmp_path / "checkpoints")
    line = _one_error_line(run_pretrain(tiny_overrides(tmp_path, shards_dir, **{"model.n_layers": 3})))
    print(line)
    assert (
        line.startswith("error: checkpoint '")
        and "holds another model than this run's: missing blocks.2." in line
    )
    assert "it was saved with model.n_layers=2 (this run: 3)" in line
