"""The low-precision tolerance rule: one owner for the kernel tests and the self-test.

Following the flash-attention test suite: a kernel's error against an fp64
reference may be at most ``factor`` times the error of PyTorch's own
computation in the same dtype against that reference, plus a small ``atol``:

    max|kernel - ref64| <= factor * max|torch_same_dtype - ref64| + atol

NaN must appear in the same places as in the reference (and inf with the same
sign); the bound applies to the finite entries. Failures raise ``AssertionError``
with the numbers (raised explicitly, so ``python -O`` keeps the checks).

Interpreted bf16: a bf16 result on CPU comes from the Triton interpreter, which
(triton 3.9, ``InterpreterBuilder.cast_impl``) truncates fp32 -> bf16 casts where
the GPU rounds to nearest even. Such results get one more bf16 ulp of
``max|reference|`` (2^-7 relative) of slack; compiled (CUDA) results do not.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
BF16_ULP = 2.0**-7  # relative spacing at the bottom of a binade (8 significant bits)


def _fail(message: str) -> None:
    raise AssertionError(message)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute difference over the entries finite in ``expected``."""
    finite = torch.isfinite(expected)
    if not finite.any():
        return 0.0
    return (actual.double()[finite] - expected.double()[finite]).abs().max().item()


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """NaN where the reference has NaN; +-inf where it has +-inf."""
    a, e = actual.double(), expected.double()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        _fail(f"{name}: NaN pattern differs")
    if not torch.equal(torch.isposinf(a), torch.isposinf(e)):
        _fail(f"{name}: +inf pattern differs")
    if not torch.equal(torch.isneginf(a), torch.isneginf(e)):
        _fail(f"{name}: -inf pattern differs")


def _check_shape(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    if actual.shape != expected.shape:
        _fail(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")


def assert_within_torch_error(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    *,
    name: str = "",
    factor: float = 2.0,
    atol: float | None = None,
) -> None:
    """Check ``actual`` against ``reference`` (fp64) with the budget set by ``baseline``.

    Args:
        actual: the kernel's result.
        baseline: PyTorch's result in the same dtype as ``actual``.
        reference: the fp64 (or fp32 for an fp32 kernel) reference result.
        name: shown on failure.
        factor: allowed multiple of PyTorch's own error.
        atol: absolute slack; defaults to ``ATOL[actual.dtype]``.
    """
    _check_shape(actual, reference, name)
    assert_same_nonfinite(actual, reference, name)
    slack = ATOL.get(actual.dtype, 1e-5) if atol is None else atol
    if actual.dtype == torch.bfloat16 and actual.device.type == "cpu":  # interpreted: truncation
        finite = reference[torch.isfinite(reference)]
        slack += BF16_ULP * (finite.abs().max().item() if finite.numel() else 0.0)
    err, base = max_err(actual, reference), max_err(baseline, reference)
    if err > factor * base + slack:
        _fail(f"{name}: kernel error {err:.3g} > {factor} x torch error {base:.3g} + {slack:.1g}")


def assert_close_fp32(
    actual: torch.Tensor, expected: torch.Tensor, *, name: str = "", tol: float = 2e-5
) -> None:
    """Tight fp32 check: same non-finite pattern, max error <= tol * max(1, max|expected|)."""
    _check_shape(actual, expected, name)
    assert_same_nonfinite(actual, expected, name)
    finite = torch.isfinite(expected)
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    err = max_err(actual, expected)
    if err > tol * scale:
        _fail(f"{name}: error {err:.3g} > {tol} x {scale:.3g}")
