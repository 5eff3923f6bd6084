"""Benchmark: megalm's model vs the ``transformers`` model a user would pick instead.

    python launch/bench_hf.py [--config configs/tiny.yaml] [--family llama|gpt2|both] [--steps 10]
                              [--warmup 3] [--vocab 4096] [--profile 3] [--out runs/bench] [key=value ...]

Per family, megalm's ``GPT`` and ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` (SDPA attention) are
built with the same shape and the SAME weights (``megalm.checkpoint.hf.to_hf``), each with
megalm's AdamW (``make_optimizer``), and train on the same batches: forward + backward +
optimizer step, the two sides alternating inside one process (ABBA...) so machine noise hits
both alike. The speed ratio is ``median step(transformers) / median step(megalm)`` (> 1: megalm
is faster); the losses of the two sides must agree (same work). ``--profile N`` adds a
``torch.profiler`` table of N forward+backward passes per side, top ops by self CPU time.
Batch = ``training.micro_batch``. ``GPT2LMHeadModel`` has no grouped-query attention, so the
gpt2 side runs with ``n_kv_heads = n_heads``. Prints a table and writes ``<out>/bench_hf.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megalm.cli import add_config_args, bad_input, bench_parser, write_report  # noqa: E402
from megalm.config import Config, ConfigError, ModelConfig, load_config  # noqa: E402
from megalm.perf.measure import alternate, max_rel_diff, synchronize, throughput  # noqa: E402

SIDES = ("megalm", "transformers")


def build_pair(m: ModelConfig, seed: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """megalm's GPT and the HF model of the same family, holding the same weights (fp32)."""
    import transformers

    from megalm.checkpoint.hf import to_hf
    from megalm.model import GPT

    ours = GPT(m, init_seed=seed)
    config, tensors = to_hf(ours.state_dict(), m)
    theirs = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    missing, unexpected = theirs.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is the embedding itself
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if "lm_head.weight" in missing and theirs.lm_head.weight is not theirs.get_input_embeddings().weight:
        raise RuntimeError("transformers did not tie lm_head to the embedding")
    return {"megalm": ours.to(device).train(), "transformers": theirs.to(device).train()}


def loss_fn(side: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; labels ``y`` are already shifted (``shift_labels``)."""
    if side == "megalm":
        return model(x, y)
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def _step(side: str, model, opt, batches, device, i: int) -> tuple[float, float]:
    """Step ``i``: one fwd + bwd + AdamW step on batch ``i`` (cycling); returns (loss, seconds)."""
    x, y = batches[i % len(batches)]
    t0 = time.perf_counter()
    loss = loss_fn(side, model, x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    synchronize(device)
    return loss.item(), time.perf_counter() - t0


def _profile(models, batch, passes: int, top: int) -> dict[str, list[dict[str, Any]]]:
    """Top ``top`` ops per side by self CPU time over ``passes`` forward+backward passes, the
    sides alternating pass by pass (as the timing does); ``share`` is the op's part of the total."""
    from torch.profiler import ProfilerActivity, profile

    x, y = batch
    totals: dict[str, dict[str, list[float]]] = {s: {} for s in SIDES}  # op -> [self CPU us, calls]
    for k in range(passes):
        for side in SIDES if k % 2 == 0 else SIDES[::-1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss_fn(side, models[side], x, y).backward()
            models[side].zero_grad(set_to_none=True)
            for e in prof.key_averages():
                t = totals[side].setdefault(e.key, [0.0, 0])
                t[0], t[1] = t[0] + e.self_cpu_time_total, t[1] + e.count
    out = {}
    for side, ops in totals.items():
        whole = sum(t for t, _ in ops.values())
        ranked = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
        out[side] = [
            {"op": op, "self_cpu_ms": t / 1e3, "share": t / whole, "calls": n // passes}
            for op, (t, n) in ranked
        ]
    return out


def compare(m: ModelConfig, cfg: Config, steps: int, warmup: int, profile_passes: int, top: int) -> dict:
    """Time ``steps`` alternating steps per side after ``warmup`` untimed ones."""
    from megalm.perf.flops import model_flops_per_token
    from megalm.train.optim import make_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = build_pair(m, cfg.run.seed, device)
    opts = {s: make_optimizer(models[s], cfg.optim, device) for s in SIDES}
    B = cfg.training.micro_batch
    gen = torch.Generator().manual_seed(cfg.data.seed)
    windows = [torch.randint(0, m.vocab_size, (B, m.seq_len + 1), generator=gen) for _ in range(4)]
    batches = [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]
    losses, times = alternate(
        {s: functools.partial(_step, s, models[s], opts[s], batches, device) for s in SIDES}, steps, warmup
    )
    tokens = B * m.seq_len
    speed = throughput(times, tokens, model_flops_per_token(m))
    out = {
        "family": m.family,
        "model": {
            k: getattr(m, k)
            for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "seq_len", "vocab_size")
        },
        "batch": B,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "kernels": m.kernels,
        "steps_timed": steps,
        "profile_passes": profile_passes,
        **speed,
        "speed_ratio_megalm_over_transformers": speed["median_step_s"]["transformers"]
        / speed["median_step_s"]["megalm"],
        "max_loss_rel_diff": max_rel_diff(losses["megalm"], losses["transformers"]),
        "losses": losses,
        "step_times_s": times,
    }
    if profile_passes:
        out["profile"] = _profile(models, batches[0], profile_passes, top)
    return out


def family_config(cfg: Config, family: str, vocab: int) -> ModelConfig:
    """The benchmark shape of ``family``: the config's model, vocabulary ``vocab`` when unset."""
    m = dataclasses.replace(cfg.model, family=family, vocab_size=cfg.model.vocab_size or vocab)
    return dataclasses.replace(m, n_kv_heads=0) if family == "gpt2" else m


def print_report(results: list[dict]) -> None:
    r0 = results[0]
    print(
        f"\nmegalm vs transformers: batch {r0['batch']} x seq {r0['model']['seq_len']}, vocab "
        f"{r0['model']['vocab_size']}, {r0['device']} x {r0['threads']} threads, fwd+bwd+AdamW, "
        f"median of {r0['steps_timed']} alternating steps"
    )
    print(f"{'family':<7} {'side':<13} {'step (ms)':>10} {'tokens/s':>10} {'TFLOP/s':>9}")
    for r in results:
        for s in SIDES:
            ms, tps, tf = r["median_step_s"][s] * 1e3, r["tokens_per_s"][s], r["tflops"][s]
            print(f"{r['family']:<7} {s:<13} {ms:>10.1f} {tps:>10,.0f} {tf:>9.4f}")
    for r in results:
        print(
            f"{r['family']}: speed ratio megalm / transformers = "
            f"{r['speed_ratio_megalm_over_transformers']:.3f} "
            f"(goal >= 1.0); max loss relative difference {r['max_loss_rel_diff']:.1e}"
        )
    for r in results:
        for s, ops in r.get("profile", {}).items():
            print(f"\n{r['family']} {s}: top ops by self CPU time ({r['profile_passes']} fwd+bwd passes)")
            print(f"  {'op':<40} {'self CPU (ms)':>14} {'share':>6} {'calls/pass':>10}")
            for op in ops:
                ms, share = op["self_cpu_ms"], op["share"]
                print(f"  {op['op'][:40]:<40} {ms:>14.1f} {share:>6.1%} {op['calls']:>10}")


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    add_config_args(p, default=str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"))
    p.add_argument("--family", choices=["llama", "gpt2", "both"], default="both")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary when model.vocab_size is 0")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N fwd+bwd passes per side")
    p.add_argument("--top", type=int, default=10, help="ops listed per profile")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        import transformers  # noqa: F401
    except ConfigError as e:
        return bad_input(e)
    except ImportError:
        return bad_input("the benchmark needs transformers: pip install 'megalm[hf]'")
    if args.steps < 1 or args.warmup < 0:
        return bad_input("--steps must be >= 1 and --warmup >= 0")
    families = ["llama", "gpt2"] if args.family == "both" else [args.family]
    results = [
        compare(family_config(cfg, f, args.vocab), cfg, args.steps, args.warmup, args.profile, args.top)
        for f in families
    ]
    print_report(results)
    write_report(args.out, "bench_hf.json", {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
