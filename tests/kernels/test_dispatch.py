"""The impl="auto" | "triton" | "torch" rule, and import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kernels import KernelUnavailableError, dispatch, rms_norm, use_triton


def test_torch_and_auto_on_cpu_take_the_pytorch_path():
    x = torch.randn(2)
    assert use_triton("torch", x) is False
    assert use_triton("auto", x) is False  # auto means Triton only for CUDA tensors


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.triton_available():
        assert use_triton("triton", x, None) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        use_triton("triton", x)
    with pytest.raises(KernelUnavailableError):
        rms_norm(torch.randn(2, 4), torch.ones(4), impl="triton")


def test_triton_without_triton_installed_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(KernelUnavailableError, match="not importable"):
        use_triton("triton", torch.randn(2))
    assert use_triton("auto", torch.randn(2)) is False


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        use_triton("cuda", torch.randn(2))


def test_importing_kernels_compiles_nothing():
    code = (
        "import sys, kernels\n"
        "ours = [m for m in sys.modules if m.startswith('kernels.')]\n"
        "loaded = [m for m in ours if m.split('.')[-1] in ('kernel', 'function')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
