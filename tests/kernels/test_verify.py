"""Self-verifying kernels under impl="auto": a wrong kernel is caught, verdicts are cached."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kernels import checks, layer_norm, rms_norm, scaled_masked_softmax, use_triton, verify
from kernels.interpreter import kernel_module
from kernels.norms import layer_norm_reference, rms_norm_reference


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Count the self-test runs per op; verdicts in a cache of this test's own."""
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "kernel_cache"))
    runs: dict[str, int] = {}
    for op, check in list(checks.CHECKS.items()):

        def spy(device, dtype, _op=op, _check=check):
            runs[_op] = runs.get(_op, 0) + 1
            return _check(device, dtype)

        monkeypatch.setitem(checks.CHECKS, op, spy)
    return runs


def warnings_of(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "kernels.verify" and r.levelno == logging.WARNING
    ]


def test_wrong_kernel_is_caught_and_auto_falls_back_with_one_warning(device, counted, caplog, monkeypatch):
    broken = kernel_module("broken_kernels")
    monkeypatch.setattr(kernel_module("kernels.norms.kernel"), "_norm_fwd_kernel", broken._norm_fwd_kernel)
    x = torch.randn(4, 50, device=device)
    w = 1 + torch.rand(50, device=device)
    assert not torch.allclose(rms_norm(x, w, impl="triton"), rms_norm_reference(x, w))  # it is wrong
    with caplog.at_level(logging.WARNING, logger="kernels.verify"):
        torch.testing.assert_close(rms_norm(x, w, impl="auto"), rms_norm_reference(x, w))
        torch.testing.assert_close(rms_norm(x, w, impl="auto"), rms_norm_reference(x, w))
        b = torch.randn(50, device=device)
        torch.testing.assert_close(layer_norm(x, w, b, impl="auto"), layer_norm_reference(x, w, b))
    assert counted == {"norms": 1}
    (message,) = warnings_of(caplog)
    assert "\n" not in message
    assert message.startswith("warning: kernel norms failed its self-test on ")
    assert "rms_norm 1000 output" in message and "using the PyTorch path" in message
    record = json.loads(next(verify.cache_dir().glob("norms-float32-*.json")).read_text())
    assert record["passed"] is False and "rms_norm 1000 output" in record["error"]


def test_passing_kernel_is_cached_and_not_rerun(device, counted, caplog):
    x = torch.randn(2, 3, 5, 40, device=device)
    with caplog.at_level(logging.WARNING, logger="kernels.verify"):
        assert use_triton("auto", x, op="softmax") is True
        out = scaled_masked_softmax(x, causal=True, impl="auto")
    assert counted == {"softmax": 1}
    files = list(verify.cache_dir().glob("softmax-float32-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["passed"] is True and record["source_sha256"] == verify.source_hash("softmax")
    verify.forget()  # a new process: the verdict comes from disk
    assert use_triton("auto", x, op="softmax") is True
    torch.testing.assert_close(scaled_masked_softmax(x, causal=True, impl="auto"), out)
    assert counted == {"softmax": 1}
    assert warnings_of(caplog) == []


def test_cache_key_changes_with_source_hash_and_dtype(device, counted, monkeypatch):
    x = torch.randn(3, 40, device=device)
    assert use_triton("auto", x, op="cross_entropy") is True
    key = verify.cache_key("cross_entropy", device, torch.float32)
    assert set(key) == {"op", "device", "triton", "source_sha256", "dtype"}
    monkeypatch.setattr(verify, "source_hash", lambda op: "0" * 64)  # the kernel was edited
    verify.forget()
    assert use_triton("auto", x, op="cross_entropy") is True
    assert counted == {"cross_entropy": 2}
    assert len(list(verify.cache_dir().glob("cross_entropy-float32-*.json"))) >= 2
    assert verify.cache_path(verify.cache_key("cross_entropy", device, torch.float16)) != verify.cache_path(
        key
    )


def test_no_self_test_where_triton_cannot_run(counted, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert use_triton("auto", torch.randn(3), op="norms") is False  # CPU, no interpreter
    assert use_triton("auto", torch.randn(3, dtype=torch.float64), op="norms") is False
    assert counted == {}


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(verify.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert verify.cache_dir() == tmp_path / "megalm" / "kernels"
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "mine"))
    assert verify.cache_dir() == tmp_path / "mine"
