"""A build lock left by a killed DeepSpeed op build is removed only when it is stale."""

from __future__ import annotations

import os

from megalm.train.ds_ops import STALE_LOCK_S, remove_stale_lock


def test_a_fresh_lock_is_kept_and_a_stale_one_removed(tmp_path):
    (tmp_path / "shm.o").write_bytes(b"x")
    lock = tmp_path / "lock"
    lock.write_bytes(b"")
    now = lock.stat().st_mtime
    assert not remove_stale_lock(tmp_path, now + STALE_LOCK_S - 60)  # a build may be running
    assert lock.exists()
    old = now - STALE_LOCK_S - 60
    for p in tmp_path.iterdir():
        os.utime(p, (old, old))
    assert remove_stale_lock(tmp_path, now)
    assert not lock.exists()
    assert not remove_stale_lock(tmp_path, now)  # nothing to remove
