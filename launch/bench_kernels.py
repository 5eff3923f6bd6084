"""Benchmark the Triton kernels against their PyTorch baselines; print a table, write JSON.

    python launch/bench_kernels.py                  # full sizes, needs CUDA
    python launch/bench_kernels.py --quick          # smaller sizes (a fast GPU smoke run)
    python launch/bench_kernels.py --dry-run        # CPU: shapes at size on 'meta', FLOP/byte
                                                    # arithmetic, tiny runs of every op

Conventions (docs/performance.md explains them):

* Attention FLOPs (FlashAttention-2 paper, Dao 2023, sec. 4.1 benchmark setting):
  forward ``4 * B * T^2 * Hq * D`` (two matmuls of 2*T*T*D per head), halved when
  causal; backward ``2.5 x`` forward (five matmuls instead of two). TFLOP/s =
  FLOPs / time. Baseline: ``F.scaled_dot_product_attention`` with the flash backend
  (any available backend when flash refuses the inputs; the JSON names it).
* Memory-bound ops (softmax, norms, cross entropy) report GB/s of compulsory
  traffic: every input read once, every output written once (what a perfect
  fused kernel moves). Baseline: eager PyTorch ops. The same byte count is used
  for both columns, so their ratio is the speed ratio. The goal is compared to
  the measured device-to-device copy bandwidth (``dst.copy_(src)``, read + write).
* Times are medians over ``--reps`` runs after ``--warmup`` runs (CUDA events);
  backward time = (forward + backward) - forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import kernels  # noqa: E402
from kernels.norms import rms_norm_reference  # noqa: E402
from kernels.softmax import scaled_masked_softmax_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION_GOAL = 1.0  # Triton fwd+bwd TFLOP/s / SDPA flash fwd+bwd TFLOP/s
BANDWIDTH_GOAL = 0.85  # kernel GB/s / device copy GB/s


def attention_flops(b: int, hq: int, t: int, d: int, *, causal: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs: 4*B*T^2*Hq*D forward, /2 causal, backward 2.5x forward."""
    fwd = 4.0 * b * t * t * hq * d
    if causal:
        fwd /= 2
    return fwd, 2.5 * fwd


@dataclass
class Case:
    """One benchmark: an op, its shape parameters, and its compulsory traffic or FLOPs."""

    name: str
    op: str  # attention | softmax | rms_norm | layer_norm | cross_entropy
    params: dict
    dtype: str = "bf16"
    extra: dict = field(default_factory=dict)

    def work(self) -> dict[str, float]:
        """FLOPs (attention) or bytes (others) per pass: keys 'fwd', 'bwd'."""
        p, es = self.params, torch.tensor([], dtype=DTYPES[self.dtype]).element_size()
        if self.op == "attention":
            fwd, bwd = attention_flops(p["b"], p["hq"], p["t"], p["d"], causal=p["causal"])
            return {"fwd": fwd, "bwd": bwd}
        if self.op == "softmax":
            n = p["b"] * p["h"] * p["t"] * p["t"]
            mask = p["b"] * p["t"] * p["t"] if p["mask"] else 0  # (B, 1, T, T) bool
            return {"fwd": 2 * n * es + mask, "bwd": 3 * n * es}
        if self.op in ("rms_norm", "layer_norm"):
            n = p["rows"] * p["hidden"]
            return {"fwd": 2 * n * es, "bwd": 3 * n * es}
        if self.op == "cross_entropy":
            n = p["rows"] * p["vocab"]
            return {"fwd": n * es, "bwd": 2 * n * es}
        raise ValueError(self.op)

    def unit(self) -> str:
        return "TFLOP/s" if self.op == "attention" else "GB/s"


def default_cases(quick: bool) -> list[Case]:
    """Realistic sizes: bf16, head dim 128, seq 2k-8k, hidden 4096 (16k tokens per batch)."""
    seqs = [2048] if quick else [2048, 4096, 8192]
    tokens = 4096 if quick else 16384
    cases = [
        Case(f"attn causal T={t}", "attention", dict(b=tokens // t, hq=32, hkv=32, t=t, d=128, causal=True))
        for t in seqs
    ]
    cases += [
        Case(
            "attn full T=4096",
            "attention",
            dict(b=tokens // 4096 or 1, hq=32, hkv=32, t=4096, d=128, causal=False),
        ),
        Case(
            "attn gqa8 T=4096",
            "attention",
            dict(b=tokens // 4096 or 1, hq=32, hkv=4, t=4096, d=128, causal=True),
        ),
        Case("softmax causal T=2048", "softmax", dict(b=4 if not quick else 1, h=32, t=2048, mask=False)),
        Case("softmax mask T=2048", "softmax", dict(b=4 if not quick else 1, h=32, t=2048, mask=True)),
        Case("rms_norm 4096", "rms_norm", dict(rows=tokens, hidden=4096)),
        Case("layer_norm 4096", "layer_norm", dict(rows=tokens, hidden=4096)),
        Case("cross_entropy V=128256", "cross_entropy", dict(rows=tokens // 2, vocab=128256)),
        Case("cross_entropy V=50304", "cross_entropy", dict(rows=tokens, vocab=50304)),
    ]
    return cases


def tiny(case: Case) -> Case:
    """The same case at a size the CPU runs in milliseconds (for --dry-run)."""
    p = dict(case.params)
    for key, small in (("b", 1), ("t", 32), ("rows", 8), ("hidden", 64), ("vocab", 100), ("h", 2)):
        if key in p:
            p[key] = small
    if case.op == "attention":
        p.update(hq=4, hkv=4 if p["hkv"] == p["hq"] else 2, d=16)
    return Case(case.name, case.op, p, case.dtype)


def build(case: Case, device: str, which: str) -> tuple[Callable, list[torch.Tensor]]:
    """Return (forward fn, inputs requiring grad) for one case.

    ``which``: "triton" or "torch" (the public ``kernels`` API with that ``impl``), or
    "baseline" (plain PyTorch: SDPA flash / eager ops).
    """
    p, dtype = case.params, DTYPES[case.dtype]
    ours, impl = which != "baseline", which

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    if case.op == "attention":
        q = rand(p["b"], p["hq"], p["t"], p["d"])
        k, v = rand(p["b"], p["hkv"], p["t"], p["d"]), rand(p["b"], p["hkv"], p["t"], p["d"])
        if ours:
            return (lambda: kernels.flash_attention(q, k, v, causal=p["causal"], impl=impl)), [q, k, v]
        return _sdpa_flash(q, k, v, p["causal"], case), [q, k, v]
    if case.op == "softmax":
        x = rand(p["b"], p["h"], p["t"], p["t"])
        mask = torch.rand(p["b"], 1, p["t"], p["t"], device=device) < 0.1 if p["mask"] else None
        kw = dict(scale=0.1, mask=mask, causal=not p["mask"])
        if ours:
            return (lambda: kernels.scaled_masked_softmax(x, impl=impl, **kw)), [x]
        return (lambda: scaled_masked_softmax_reference(x, **kw)), [x]
    if case.op in ("rms_norm", "layer_norm"):
        x = rand(p["rows"], p["hidden"])
        w = torch.randn(p["hidden"], device=device).requires_grad_()  # fp32 weights
        if case.op == "rms_norm":
            if ours:
                return (lambda: kernels.rms_norm(x, w, impl=impl)), [x, w]
            return (lambda: rms_norm_reference(x, w)), [x, w]
        if ours:
            return (lambda: kernels.layer_norm(x, w, None, impl=impl)), [x, w]
        return (lambda: F.layer_norm(x, (p["hidden"],), w.to(dtype))), [x, w]
    if case.op == "cross_entropy":
        logits = rand(p["rows"], p["vocab"])
        labels = torch.randint(0, p["vocab"], (p["rows"],), device=device)
        if ours:
            return (lambda: kernels.cross_entropy(logits, labels, impl=impl)), [logits]
        return (lambda: F.cross_entropy(logits, labels, reduction="none")), [logits]
    raise ValueError(case.op)


def _sdpa_flash(q, k, v, causal: bool, case: Case) -> Callable:
    """SDPA restricted to the flash backend when it accepts the inputs, else any backend."""
    group = q.shape[1] // k.shape[1]
    kwargs = {"enable_gqa": True} if group > 1 else {}

    def any_backend():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)

    if q.device.type != "cuda":
        case.extra["baseline"] = "sdpa (cpu/meta)"
        return any_backend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)

    try:
        flash()
        case.extra["baseline"] = "sdpa flash"
        return flash
    except RuntimeError:
        case.extra["baseline"] = "sdpa (flash refused: default backend)"
        return any_backend


def _loss_sum(out) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.float().sum() for o in outs)


def time_ms(fn: Callable, *, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs, CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def copy_bandwidth_gbs(*, warmup: int, reps: int, gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=warmup, reps=reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def measure(case: Case, impl: str, *, warmup: int, reps: int, device: str = "cuda") -> dict[str, float]:
    """Milliseconds for fwd, fwd+bwd and bwd (difference) of one implementation."""
    fwd, inputs = build(case, device, impl)
    out = fwd()
    grads = [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]

    def fwd_bwd():
        outs = fwd()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, inputs, grads)

    ms_fwd = time_ms(fwd, warmup=warmup, reps=reps)
    ms_all = time_ms(fwd_bwd, warmup=warmup, reps=reps)
    return {"fwd": ms_fwd, "fwd+bwd": ms_all, "bwd": max(ms_all - ms_fwd, 1e-6)}


def rate(work: float, ms: float, unit: str) -> float:
    return work / (ms * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)


def run_case(case: Case, *, warmup: int, reps: int, copy_gbs: float | None) -> list[dict]:
    work = case.work()
    work["fwd+bwd"] = work["fwd"] + work["bwd"]
    ours = measure(case, "triton", warmup=warmup, reps=reps)
    base = measure(case, "baseline", warmup=warmup, reps=reps)
    rows = []
    for pass_name in ("fwd", "bwd", "fwd+bwd"):
        row = {
            "name": case.name, "op": case.op, "pass": pass_name, "unit": case.unit(),
            "params": case.params, "dtype": case.dtype,
            "triton_ms": ours[pass_name], "torch_ms": base[pass_name],
            "triton": rate(work[pass_name], ours[pass_name], case.unit()),
            "torch": rate(work[pass_name], base[pass_name], case.unit()),
            **case.extra,
        }  # fmt: skip
        row["ratio"] = row["triton"] / row["torch"]
        if case.op == "attention" and pass_name == "fwd+bwd":
            row["goal"] = f">= {ATTENTION_GOAL} x torch"
            row["meets_goal"] = row["ratio"] >= ATTENTION_GOAL
        elif case.op != "attention" and copy_gbs:
            row["of_copy_bw"] = row["triton"] / copy_gbs
            row["goal"] = f">= {BANDWIDTH_GOAL} x copy"
            row["meets_goal"] = row["of_copy_bw"] >= BANDWIDTH_GOAL
        rows.append(row)
    return rows


def dry_run(cases: list[Case]) -> list[dict]:
    """CPU-only checks: FLOP arithmetic, full-size shapes on 'meta', tiny runs of each op."""
    fwd, bwd = attention_flops(1, 1, 2, 1, causal=False)
    assert (fwd, bwd) == (16.0, 40.0), "4*b*s^2*h*d forward, 2.5x backward"
    # FLOPs from the matmul shapes: S = Q K^T and O = P V, 2*T*T*D each, per (b, h).
    b, h, t, d = 2, 3, 64, 16
    assert attention_flops(b, h, t, d, causal=False)[0] == b * h * 2 * (2 * t * t * d)
    assert attention_flops(b, h, t, d, causal=True)[0] == attention_flops(b, h, t, d, causal=False)[0] / 2
    rows = []
    for case in cases:
        work = case.work()
        assert all(v > 0 and math.isfinite(v) for v in work.values()), (case.name, work)
        try:  # full-size shapes without memory: the torch path on the meta device
            fn, _ = build(case, "meta", "baseline")
            out = fn()
            meta_shape = [list(o.shape) for o in (out if isinstance(out, tuple) else (out,))]
        except (NotImplementedError, RuntimeError) as err:  # an op without a meta kernel
            meta_shape = f"meta unsupported: {type(err).__name__}"
        for which in ("torch", "baseline"):  # the kernels API's torch path, and the baseline
            fn, inputs = build(tiny(case), "cpu", which)
            torch.autograd.grad(_loss_sum(fn()), inputs, allow_unused=True)
        row = {"name": case.name, "op": case.op, "unit": case.unit(), "params": case.params}
        row.update(
            dtype=case.dtype, work_fwd=work["fwd"], work_bwd=work["bwd"], meta_output_shapes=meta_shape
        )
        rows.append(row)
    return rows


def print_table(rows: list[dict], copy_gbs: float | None) -> None:
    if copy_gbs:
        print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    head = f"{'case':<26}{'pass':<9}{'unit':<9}{'triton':>10}{'torch':>10}{'ratio':>8}{'of copy':>9}  goal"
    print(head)
    print("-" * len(head))
    for r in rows:
        of_copy = f"{r['of_copy_bw']:.2f}" if "of_copy_bw" in r else ""
        goal = ("ok " if r.get("meets_goal") else "MISS ") + r["goal"] if "goal" in r else ""
        print(
            f"{r['name']:<26}{r['pass']:<9}{r['unit']:<9}{r['triton']:>10.1f}{r['torch']:>10.1f}"
            f"{r['ratio']:>8.2f}{of_copy:>9}  {goal}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU checks only; no kernels at size")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--ops", default="", help="comma list to keep, e.g. attention,rms_norm")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default="runs/bench/kernels.json", help="where to write results")
    args = parser.parse_args(argv)

    cases = default_cases(args.quick)
    if args.ops:
        keep = set(args.ops.split(","))
        cases = [c for c in cases if c.op in keep]
    for c in cases:
        c.dtype = args.dtype
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "flop_convention": "attention fwd 4*B*T^2*Hq*D (/2 causal), bwd 2.5x fwd",
        "byte_convention": "compulsory traffic: inputs read once, outputs written once",
    }
    if args.dry_run:
        rows = dry_run(cases)
        meta["device"] = "cpu (dry run)"
        for r in rows:
            print(f"{r['name']:<26}{r['unit']:<9} fwd {r['work_fwd']:.3e}  bwd {r['work_bwd']:.3e}  "
                  f"meta out {r['meta_output_shapes']}")  # fmt: skip
        copy_gbs = None
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run", file=sys.stderr)
            return 2
        import triton

        meta.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
        copy_gbs = copy_bandwidth_gbs(warmup=args.warmup, reps=args.reps)
        rows = []
        for case in cases:
            print(f"running {case.name} ...", file=sys.stderr, flush=True)
            rows += run_case(case, warmup=args.warmup, reps=args.reps, copy_gbs=copy_gbs)
        print_table(rows, copy_gbs)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "copy_bandwidth_gbs": copy_gbs, "results": rows}, indent=2) + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
