"""Compile every Triton kernel variant for an NVIDIA target without a GPU (nothing launches).

The interpreter runs kernels as Python and accepts code the compiler rejects (for
instance a plain global read from a kernel), so the CPU suite also compiles each
kernel through Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with
the ptxas bundled in the triton wheel). Run as a script with TRITON_INTERPRET=0:

    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py [--arch 90] [--ptxas-info]

It replaces ``JITFunction.run`` so that each launch made by the real launchers
(on small CPU tensors) is compiled for ``--arch`` instead of run, then prints one
line per kernel with its shared memory (and, with ``--ptxas-info``, registers and
spills). Exit status 0 when every variant compiled.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
}


def _signature(fn, args, kwargs):
    names = fn.arg_names
    bound = dict(zip(names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    options = {k: v for k, v in kwargs.items() if k not in names}
    return signature, constexprs, options


def _ptxas_info(ptx: str, arch: int) -> str:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the newest PTX
        ptxas = bin_dir / name
        if not ptxas.exists():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        proc = subprocess.run(
            [str(ptxas), f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True
        )
        os.unlink(f.name)
        if proc.returncode == 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            return " | ".join(
                ln.split(":", 1)[-1].strip() for ln in lines if "registers" in ln or "spill" in ln
            )
    return "ptxas unavailable"


def install_compiler(arch: int, ptxas_info: bool, compiled: list[str]) -> None:
    """Route every kernel launch to ``triton.compile`` for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)

    def compile_instead_of_run(self, *args, grid, warmup, **kwargs):
        signature, constexprs, options = _signature(self, args, kwargs)
        kernel = triton.compile(ASTSource(self, signature, constexprs), target=target, options=options)
        flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())
        line = f"{self.__name__:<34} shared={kernel.metadata.shared:>6}  {options}  {flags}"
        if ptxas_info:
            line += "\n    " + _ptxas_info(kernel.asm["ptx"], arch)
        print(line, flush=True)
        compiled.append(self.__name__)

    JITFunction.run = compile_instead_of_run


def launch_every_variant() -> None:
    """Call the real launchers with the variants the model and benchmarks use.

    The tensors live on ``meta``: a launch on them takes the compiled kernel (CPU
    tensors would take the interpreter, ``kernels.interpreter.launcher``), and
    nothing is ever read or written.
    """
    from kernels.attention.function import attention_bwd_launch, attention_fwd_launch
    from kernels.cross_entropy.function import partials_forward, slice_grad_forward
    from kernels.norms.function import norm_backward, norm_forward
    from kernels.softmax.function import softmax_backward, softmax_forward

    def empty(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    for dtype, d, hq, hkv, tk, causal, docs in [
        (torch.bfloat16, 128, 4, 4, 300, True, False),
        (torch.bfloat16, 128, 4, 1, 300, True, True),
        (torch.bfloat16, 64, 4, 4, 300, False, False),
        (torch.bfloat16, 128, 4, 2, 170, False, True),  # a ring-attention block: Tq != Tk
        (torch.float16, 80, 2, 2, 300, True, False),
        (torch.float32, 64, 2, 2, 300, True, True),
    ]:
        q, k = empty(1, hq, 300, d, dtype=dtype), empty(1, hkv, tk, d, dtype=dtype)
        doc_q = empty(1, 300, dtype=torch.int64) if docs else None
        doc_k = empty(1, tk, dtype=torch.int64) if docs and tk != 300 else None
        out, lse = attention_fwd_launch(q, k, k, doc_q, doc_k, causal, 0.1)
        attention_bwd_launch(q, q, k, k, out, lse, doc_q, doc_k, causal, 0.1)
    for dtype, tq, tk, with_mask, q_offset in [
        (torch.bfloat16, 3, 2048, True, 0),
        (torch.bfloat16, 3, 8192, False, 0),
        (torch.bfloat16, 1, 2048, True, 2047),  # a KV-cache decode row
        (torch.float32, 3, 100, True, 0),
    ]:
        x = empty(1, 2, tq, tk, dtype=dtype)
        mask = empty(1, 1, tq, tk, dtype=torch.bool) if with_mask else None
        y = softmax_forward(x, scale=0.1, mask=mask, causal=True, q_offset=q_offset)
        softmax_backward(y, y, scale=0.1)
    for dtype, hidden, bias, is_rms in [
        (torch.bfloat16, 4096, False, True),
        (torch.bfloat16, 4096, True, False),
        (torch.float32, 1000, True, False),
    ]:
        x, w = empty(5, hidden, dtype=dtype), empty(hidden)
        b = empty(hidden) if bias else None
        y, mean, rstd = norm_forward(x, w, b, 1e-5, is_rms)
        norm_backward(y, x, w, b, mean, rstd, is_rms)
    for dtype in (torch.bfloat16, torch.float32):
        logits, labels = empty(4, 50304, dtype=dtype), empty(4, dtype=torch.int64)
        partials_forward(logits, labels, 0)
        slice_grad_forward(logits, labels, empty(4), empty(4), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="sm_XX compute capability (90 = H100/H200)")
    parser.add_argument("--ptxas-info", action="store_true", help="print registers and spills")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    compiled: list[str] = []
    install_compiler(args.arch, args.ptxas_info, compiled)
    launch_every_variant()
    print(f"compiled {len(compiled)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
