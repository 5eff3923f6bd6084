"""Layout planner: enumerate TP x CP x PP x DP x ZeRO x micro-batch x recompute, predict memory and time.

Memory per device is :mod:`megalm.perf.memory` (ZeRO model states, Rajbhandari et
al. 2020; activations, Korthikanti et al. 2022). The step-time estimate is a
roofline sum, every term from the device table (:data:`megalm.perf.devices.DEVICES`):

- compute: each layer GEMM ``(M x K) @ (K x N)`` takes
  ``max(2 M K N / (peak * gemm_efficiency), 2 (M K + K N + M N) / HBM)``;
  causal flash attention ``2 M s h / tp`` forward FLOPs at the same efficiency;
  backward = 2 x forward; recompute adds the forward again (full) or the
  attention core (selective);
- tensor parallel: 4 all-reduces per layer and micro-batch (6 with full recompute)
  of ``M h`` bf16 values, ring volume ``2 (t-1)/t`` (Korthikanti et al. 2022, 4.2.2),
  over NVLink when ``tp <= gpus_per_node``;
- pipeline: 1F1B with ``m`` micro-batches takes ``(m + p - 1)`` stage times
  (bubble ``(p-1)/m``, Narayanan et al. 2021, sec. 2.2.1) plus two point-to-point
  activation transfers per micro-batch over InfiniBand;
- context parallel (:mod:`megalm.perf.cp`): a rank holds and multiplies ``s / cp``
  tokens (activations, GEMMs, TP traffic divided by ``cp``), its attention still spans
  all ``s`` keys; the ring's K/V (and dK/dV) hops per layer overlap with that attention,
  so only the part of each transfer longer than the attention it hides behind counts,
  over NVLink when ``tp * cp <= gpus_per_node``;
- data parallel: one gradient all-reduce of the device's bf16 gradients per step over
  the ``d = dp * cp`` ranks that share weights, ring volume ``2 (d-1)/d`` (ZeRO 1/2:
  reduce-scatter + all-gather, same volume; ZeRO 3: 1.5x, Rajbhandari et al. 2020,
  sec. 7.2), over InfiniBand when that group leaves the node; not overlapped with
  compute (a pessimistic bound);
- optimizer: reading and writing the local optimizer states once at HBM speed.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from megalm.config import ModelConfig
from megalm.parallel.layout import Layout, layout_problems
from megalm.perf.cp import local_model, ring_hop_bytes
from megalm.perf.devices import Device
from megalm.perf.flops import hardware_flops_per_token, model_flops_per_token
from megalm.perf.memory import Recipe, StateBytes, activation_bytes, params_per_device, zero_model_state_bytes

GB = 1e9


@dataclass
class Estimate:
    """Predicted memory (bytes per device) and step time (seconds) of one layout."""

    layout: Layout
    states: dict[str, float]
    activations: float
    step_s: float
    parts: dict[str, float]
    mfu: float
    tokens_per_s_per_device: float

    @property
    def memory(self) -> float:
        return self.states["total"] + self.activations


@dataclass
class Plan:
    """The planner's answer: fitting layouts (fastest first) and rejections by reason."""

    devices: int
    device: Device
    usable_bytes: float
    fits: list[Estimate] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    too_big: list[Estimate] = field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(cfg: ModelConfig, lay: Layout, global_batch: int, gpus_per_node: int) -> tuple[str, str]:
    """``(rule, message)`` of the first reason a layout cannot be used here, else ``("", "")``.

    Validity is :func:`megalm.parallel.layout.layout_problems` (the trainer's rules); the
    planner adds one hardware rule of its own: TP stays inside a node (NVLink).
    """
    if lay.tp > gpus_per_node:
        return "tp crosses nodes", f"tp={lay.tp} > {gpus_per_node} GPUs per node (TP needs NVLink)"
    problems = layout_problems(cfg, lay, global_batch)
    return (problems[0].rule, problems[0].message) if problems else ("", "")


def _gemm_s(m: float, k: float, n: float, dev: Device, eff: float) -> float:
    """Roofline time of ``(m x k) @ (k x n)`` in bf16."""
    return max(2 * m * k * n / (dev.peak_flops * eff), 2 * (m * k + k * n + m * n) / dev.hbm_bytes_per_s)


def estimate(
    cfg: ModelConfig,
    lay: Layout,
    dev: Device,
    global_batch: int,
    recipe: Recipe | None = None,
    gemm_efficiency: float = 0.8,
) -> Estimate:
    """Memory and step time of ``lay`` for ``cfg`` on ``dev`` (module docstring)."""
    recipe = recipe or Recipe.megalm(cfg, "bf16")
    h, s, t, cp = cfg.d_model, cfg.seq_len, lay.tp, lay.cp
    n_micro = global_batch // (lay.micro_batch * lay.dp)
    psi = params_per_device(cfg, t, lay.pp)
    states = zero_model_state_bytes(psi, lay.dp * cp, lay.zero, StateBytes.mixed_adam())
    acts = activation_bytes(
        local_model(cfg, cp), lay.micro_batch, t, lay.pp, lay.sp, lay.recompute, recipe, n_micro
    )  # type: ignore[arg-type]

    M = lay.micro_batch * s // cp  # tokens per micro-batch on this rank
    kvw = cfg.kv_heads * cfg.head_size
    H = cfg.ffn_size
    gated = 2 if cfg.family == "llama" else 1
    e = dev.peak_flops * gemm_efficiency
    fwd = (
        _gemm_s(M, h, (h + 2 * kvw) / t, dev, gemm_efficiency)
        + _gemm_s(M, h / t, h, dev, gemm_efficiency)
        + _gemm_s(M, h, gated * H / t, dev, gemm_efficiency)
        + _gemm_s(M, H / t, h, dev, gemm_efficiency)
    )
    attn_fwd = 2 * M * s * h / t / e  # causal flash attention: half of 4 M s h
    layer = 3 * fwd + 3 * attn_fwd
    if lay.recompute == "full":
        layer += fwd + attn_fwd
    elif lay.recompute == "selective":
        layer += attn_fwd
    head = 3 * _gemm_s(M, h, cfg.padded_vocab(t) / t, dev, gemm_efficiency)
    layers_stage = -(-cfg.n_layers // lay.pp)  # the busiest stage of an uneven split
    compute_stage = layers_stage * layer + (head if lay.pp == 1 else 0)
    if lay.pp > 1:
        compute_stage = max(compute_stage, layers_stage * layer + head)

    tp_bw = dev.intra_node_bytes_per_s
    n_ar = 6 if lay.recompute == "full" else 4
    tp_comm = layers_stage * n_ar * 2 * (t - 1) / t * M * h * 2 / tp_bw if t > 1 else 0.0
    p2p = 2 * M * h * 2 / (t if lay.sp else 1) / dev.inter_node_bytes_per_s if lay.pp > 1 else 0.0
    cp_comm = layers_stage * _ring_exposed_s(cfg, lay, dev, attn_fwd)
    pipeline = (n_micro + lay.pp - 1) * (compute_stage + tp_comm + p2p + cp_comm)

    dp_ranks = lay.dp * cp  # ranks that hold the same weights and average gradients
    dp_bw = dev.inter_node_bytes_per_s if t * dp_ranks > dev.gpus_per_node else dev.intra_node_bytes_per_s
    dp_comm = 2 * (dp_ranks - 1) / dp_ranks * psi * 2 / dp_bw * (1.5 if lay.zero == 3 else 1.0)
    optimizer = 2 * states["optimizer"] / dev.hbm_bytes_per_s
    step = pipeline + dp_comm + optimizer
    devices = t * lay.pp * lay.dp * cp
    tokens = global_batch * s
    # causal count, as the roofline above runs causal attention (the non-causal convention
    # would put long-sequence layouts above 100 % MFU)
    model_flops = tokens * model_flops_per_token(cfg, causal=True)
    parts = {
        "compute": (n_micro + lay.pp - 1) * compute_stage,
        "bubble": (lay.pp - 1) * compute_stage,
        "tp_comm": (n_micro + lay.pp - 1) * tp_comm,
        "pp_comm": (n_micro + lay.pp - 1) * p2p,
        "cp_comm": (n_micro + lay.pp - 1) * cp_comm,
        "dp_comm": dp_comm,
        "optimizer": optimizer,
        "hw_flops": tokens * hardware_flops_per_token(cfg, lay.recompute),  # type: ignore[arg-type]
    }
    return Estimate(lay, states, acts, step, parts, model_flops / (devices * step * dev.peak_flops),
                    tokens / step / devices)  # fmt: skip


def _ring_exposed_s(cfg: ModelConfig, lay: Layout, dev: Device, attn_fwd_s: float) -> float:
    """Seconds per layer and micro-batch the attention ring adds: each K/V hop (forward, backward,
    recompute) and dK/dV hop (backward, fp32) minus the block of attention it overlaps with."""
    if lay.cp == 1:
        return 0.0
    bw = dev.intra_node_bytes_per_s if lay.tp * lay.cp <= dev.gpus_per_node else dev.inter_node_bytes_per_s
    hop = ring_hop_bytes(cfg, lay.micro_batch, lay.cp, lay.tp) / bw  # bf16 K and V of one rank
    block = attn_fwd_s / lay.cp  # one ring step's share of this rank's attention (balanced)
    forwards = 2 if lay.recompute == "full" else 1
    return (lay.cp - 1) * (forwards * max(0.0, hop - block) + max(0.0, 3 * hop - 2 * block))


def _cp_degrees(cfg: ModelConfig, devices: int) -> list[int]:
    """Context-parallel degrees worth trying: powers of two dividing ``devices`` whose chunks
    (``seq_len / 2cp``) keep at least 512 tokens (shorter blocks cannot hide their hop)."""
    return [c for c in _divisors(devices) if c & (c - 1) == 0 and (c == 1 or cfg.seq_len // (2 * c) >= 512)]


def enumerate_layouts(cfg: ModelConfig, devices: int, gpus_per_node: int) -> list[Layout]:
    """Every TP x CP x PP x DP x ZeRO x micro-batch x SP x recompute combination (unchecked)."""
    out = []
    tps = [t for t in _divisors(devices) if t <= max(gpus_per_node * 2, 1) and t & (t - 1) == 0]
    for tp, cp, pp in itertools.product(tps, _cp_degrees(cfg, devices), _divisors(devices)):
        if devices % (tp * cp * pp) or pp > cfg.n_layers:
            continue
        for zero, mb, sp, rc in itertools.product(
            (0, 1, 2, 3), (1, 2, 4, 8), (False, True), ("none", "selective", "full")
        ):
            if sp and tp == 1:
                continue
            out.append(Layout(tp, pp, devices // (tp * cp * pp), zero, mb, sp, rc, cp))
    return out


def plan(
    cfg: ModelConfig,
    devices: int,
    device: Device,
    global_batch: int,
    seq_len: int | None = None,
    usable_fraction: float = 0.9,
    recipe: Recipe | None = None,
) -> Plan:
    """Estimate every buildable layout; keep those that fit ``usable_fraction`` of memory.

    The rest of the device memory is left to the CUDA context, NCCL buffers and
    allocator fragmentation.
    """
    if seq_len:
        cfg = dataclasses.replace(cfg, seq_len=seq_len)
    result = Plan(devices, device, device.memory_bytes * usable_fraction)
    for lay in enumerate_layouts(cfg, devices, device.gpus_per_node):
        reason, detail = layout_problem(cfg, lay, global_batch, device.gpus_per_node)
        if reason:
            result.rejected.setdefault(reason, []).append(f"{lay.short()}: {detail}")
            continue
        est = estimate(cfg, lay, device, global_batch, recipe)
        if est.memory > result.usable_bytes:
            result.too_big.append(est)
        else:
            result.fits.append(est)
    result.fits.sort(key=lambda e: (e.step_s, e.memory))
    result.too_big.sort(key=lambda e: e.memory)
    return result


def describe_memory(e: Estimate) -> str:
    """``states P+G+O = X GB + activations Y GB = Z GB`` for one estimate."""
    st = e.states
    return (
        f"params {st['params'] / GB:.1f} + grads {st['grads'] / GB:.1f} + "
        f"optimizer {st['optimizer'] / GB:.1f} + activations {e.activations / GB:.1f} = "
        f"{e.memory / GB:.1f} GB"
    )


def explain_cp(p: Plan) -> list[str]:
    """Why the best layout splits sequences (context parallelism), or nothing when it does not:
    what the layouts without cp would need (the smallest out of memory, by recompute policy),
    and the fastest of them that fits, if any."""
    best = p.fits[0]
    if best.layout.cp == 1:
        return []
    cap, lines = p.usable_bytes / GB, [f"    why cp={best.layout.cp}: without context parallelism (cp=1)"]
    for rc in ("none", "selective", "full"):
        fit = [e for e in p.fits if e.layout.cp == 1 and e.layout.recompute == rc]
        big = [e for e in p.too_big if e.layout.cp == 1 and e.layout.recompute == rc]
        if not fit and big:
            e = big[0]  # too_big is sorted by memory
            lines.append(
                f"      recompute={rc}: no layout fits ({len(big)} out of memory); the smallest, "
                f"{e.layout.short()}, needs {describe_memory(e)} > {cap:.1f} GB"
            )
        elif fit:
            e = fit[0]  # fits are sorted by step time
            lines.append(
                f"      recompute={rc}: {len(fit)} fit; the fastest, {e.layout.short()}, takes "
                f"{e.step_s:.2f} s per step, {e.step_s / best.step_s - 1:.0%} slower than #1"
                + (" (it recomputes every forward)" if rc == "full" else "")
            )
    return lines


def format_plan(p: Plan, top: int = 10) -> str:
    """The best layouts, then every rejection reason with counts and examples (with numbers)."""
    d = p.device
    lines = [
        f"device {d.name}: peak {d.peak_flops / 1e12:.0f} TFLOP/s dense bf16, {d.memory_bytes / GB:.0f} GB "
        f"({p.usable_bytes / GB:.1f} GB usable), HBM {d.hbm_bytes_per_s / 1e12:.2f} TB/s, NVLink "
        f"{d.intra_node_bytes_per_s / GB:.0f} GB/s, IB {d.inter_node_bytes_per_s / GB:.0f} GB/s per GPU",
        "predicted MFU = model FLOPs/step (6*N_mm + 6*L*T*d per token: causal attention, as in the "
        "step time) / (devices x step time x peak)",
        "",
        f"best of {len(p.fits)} layouts that fit {p.devices} devices:",
        f"{'#':>3} {'layout':<57} {'mem GB':>7} {'step s':>8} {'tok/s/dev':>10} {'MFU':>6}  "
        "compute/bubble/tp/pp/cp/dp comm (s)",
    ]
    for i, e in enumerate(p.fits[:top], 1):
        q = e.parts
        lines.append(
            f"{i:>3} {e.layout.short():<57} {e.memory / GB:>7.1f} {e.step_s:>8.2f} "
            f"{e.tokens_per_s_per_device:>10,.0f} {e.mfu:>6.1%}  {q['compute']:.2f}/{q['bubble']:.2f}/"
            f"{q['tp_comm']:.2f}/{q['pp_comm']:.2f}/{q['cp_comm']:.2f}/{q['dp_comm']:.2f}"
        )
    if p.fits:
        lines.append(f"    memory of #1: {describe_memory(p.fits[0])}")
        lines += explain_cp(p)
    lines += ["", "rejected:"]
    if p.too_big:
        n, cap = len(p.too_big), p.usable_bytes / GB
        lines.append(f"  out of memory ({n} layouts > {cap:.1f} GB); per tp x cp x pp x zero, the smallest:")
        smallest: dict[tuple[int, int, int, int], Estimate] = {}
        for e in p.too_big:  # sorted by memory: the first of each group is its smallest
            smallest.setdefault((e.layout.tp, e.layout.cp, e.layout.pp, e.layout.zero), e)
        shown = list(smallest.values())
        for e in shown[: 2 * top]:
            lines.append(f"    {e.layout.short()}: {describe_memory(e)}")
        if len(shown) > 2 * top:
            lines.append(f"    ... {len(shown) - 2 * top} more groups")
    for reason, items in sorted(p.rejected.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {reason} ({len(items)} layouts), e.g. {items[0]}")
    return "\n".join(lines)
