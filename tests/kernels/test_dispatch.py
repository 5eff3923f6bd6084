"""The impl="auto" | "triton" | "torch" rule, where the interpreter applies, import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import INTERPRET_AT_START, interpreter_forced

from kernels import KernelUnavailableError, dispatch, rms_norm, use_triton
from kernels.norms import rms_norm_reference
from tests.conftest import subprocess_env


def test_torch_and_auto_on_cpu_take_the_pytorch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2)
    assert use_triton("torch", x, op="norms") is False
    assert use_triton("auto", x, op="norms") is False  # CPU without the interpreter: PyTorch


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch.triton_available():
        assert use_triton("triton", x, None, op="norms") is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        use_triton("triton", x, op="norms")
    with pytest.raises(KernelUnavailableError):
        rms_norm(torch.randn(2, 4), torch.ones(4), impl="triton")


def test_triton_without_triton_installed_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(KernelUnavailableError, match="not importable"):
        use_triton("triton", torch.randn(2), op="norms")
    assert use_triton("auto", torch.randn(2), op="norms") is False


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        use_triton("cuda", torch.randn(2), op="norms")


def test_mixed_devices_are_refused_for_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    with pytest.raises(KernelUnavailableError, match="one device"):
        use_triton("triton", torch.randn(2), torch.randn(2, device="meta"), op="norms")


def test_interpreter_is_scoped_to_the_tests_that_ask_for_it():
    """Issue 13: no process-wide TRITON_INTERPRET; subprocesses never inherit one."""
    assert os.environ.get("TRITON_INTERPRET") == INTERPRET_AT_START
    if not interpreter_forced():
        with pytest.raises(KernelUnavailableError):  # so Triton on CPU is refused here
            rms_norm(torch.randn(2, 4), torch.ones(4), impl="triton")


def test_subprocesses_never_inherit_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in subprocess_env()


def test_cpu_tests_really_run_the_triton_kernels_in_the_interpreter(interpreter, interpreted_launches):
    x, w = torch.randn(3, 40, device=interpreter), torch.randn(40, device=interpreter)
    out = rms_norm(x, w, impl="triton")
    assert interpreted_launches == ["_norm_fwd_kernel"]
    torch.testing.assert_close(out, rms_norm_reference(x, w))


def test_interpreted_and_compiled_launches_share_a_process(interpreter, monkeypatch):
    """CPU launches take an interpreted twin; the kernels stay compilable for sm_90 afterwards."""
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from kernels.interpreter import kernel_module, launcher

    kern = kernel_module("kernels.norms.kernel")
    assert isinstance(kern._norm_fwd_kernel, JITFunction)  # even with TRITON_INTERPRET=1 set now
    assert isinstance(launcher(kern._norm_fwd_kernel, torch.empty(0)), InterpretedFunction)
    assert launcher(kern._norm_fwd_kernel, torch.empty(0, device="meta")) is kern._norm_fwd_kernel
    builtins = {name: getattr(tl.core, name) for name in ("load", "store", "reduce", "arange", "where")}
    x = torch.randn(3, 40)
    torch.testing.assert_close(
        rms_norm(x, torch.ones(40), impl="triton"), rms_norm_reference(x, torch.ones(40))
    )
    assert {name: getattr(tl.core, name) for name in builtins} == builtins  # interpreter patches undone
    signature = {"X": "*fp32", "W": "*fp32", "B": "*fp32", "Y": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                 "stride_xm": "i32", "stride_ym": "i32", "n_cols": "i32", "eps": "fp32",
                 "IS_RMS": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr"}  # fmt: skip
    constexprs = {"IS_RMS": True, "HAS_BIAS": False, "BLOCK_N": 64}
    compiled = triton.compile(
        ASTSource(kern._norm_fwd_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32)
    )
    assert "ld.global" in compiled.asm["ptx"]


def test_importing_kernels_compiles_nothing():
    code = (
        "import sys, kernels\n"
        "ours = [m for m in sys.modules if m.startswith('kernels.')]\n"
        "loaded = [m for m in ours if m.split('.')[-1] in ('kernel', 'function')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_compile_constant_marker_is_the_one_torch_sets():
    """kernels.dispatch marks ``_decide`` constant for torch.compile without importing dynamo;
    the marker must stay what ``torch.compiler.assume_constant_result`` sets."""
    from kernels.dispatch import _decide

    def probe() -> int:
        return 0

    torch.compiler.assume_constant_result(probe)
    marked = dict(vars(probe))
    assert marked == {"_dynamo_marked_constant": True} and _decide._dynamo_marked_constant is True
