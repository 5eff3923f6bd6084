"""Context parallelism (ring attention) equals the unsplit model, alone and composed (gloo, CPU)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

from kernels.attention import attention_reference
from megalm.config import ConfigError, ModelConfig, load_config
from megalm.data import PackedWindows, TrainBatches
from megalm.model import GPT
from megalm.parallel import ParallelContext, ParallelDims
from megalm.parallel.context import chunk_positions, gather_sequence, shard_sequence
from megalm.parallel.layout import check_layout
from megalm.parallel.mappings import COMM_BYTES
from megalm.parallel.ring import ring_attention
from megalm.perf.cp import ring_bytes_per_layer
from tests.conftest import tiny_overrides
from tests.distributed import run_distributed
from tests.launching import run_pretrain

V = 500


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (scale floored at 1e-4: some gradients are zero in exact arithmetic)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-4)).item()


# -- the sequence layout ----------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_chunks_cover_the_sequence_once_with_equal_causal_work(cp):
    T = 24 * cp
    parts = [chunk_positions(T, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(T))
    for p in parts:
        assert torch.all(p[1:] > p[:-1])  # increasing: the diagonal block is plain causal
    # query at position i sees i + 1 keys: every rank the same total
    assert len({int((p + 1).sum()) for p in parts}) == 1
    x = torch.arange(2 * T).view(2, T)
    assert torch.equal(shard_sequence(x, cp, cp - 1), x[:, parts[-1]])
    with pytest.raises(ValueError, match="2 \\* cp"):
        chunk_positions(T + 1, cp if cp > 1 else 2, 0)


def test_loader_gives_each_cp_rank_its_chunks_of_the_same_windows():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=int(n)) for n in rng.integers(5, 60, size=80)]
    windows = PackedWindows(docs, seq_len=32, eos_id=0)

    def batches(cp_rank, cp):  # noqa: E306
        loader = TrainBatches(
            windows, 7, 8, 2, dp_rank=1, dp_size=2, with_ids=True, cp_rank=cp_rank, cp_size=cp
        )
        return loader.step_batches()  # fmt: skip

    whole = batches(0, 1)
    for cp in (2, 4):
        pieces = [batches(r, cp) for r in range(cp)]
        for j, full in enumerate(whole):
            for k, tensor in enumerate(full):  # tokens, labels, position ids, document ids
                got = torch.empty_like(tensor)
                for r in range(cp):
                    got[:, chunk_positions(32, cp, r)] = pieces[r][j][k]
                assert torch.equal(got, tensor), (cp, j, k)


# -- the grid ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tp,cp,dp,pp", [(2, 2, 2, 1), (1, 4, 1, 2), (2, 2, 1, 2), (1, 2, 3, 1), (4, 1, 2, 1)]
)
def test_grid_groups_match_megatron_rank_generator_and_deepspeed_topology(tp, cp, dp, pp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core.parallel_state import RankGenerator

    dims = ParallelDims(tp, pp, dp, cp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for ours, token in [
        (dims.tp_groups(), "tp"),
        (dims.cp_groups(), "cp"),
        (dims.dp_groups(), "dp"),
        (dims.dp_cp_groups(), "dp-cp"),
        (dims.pp_groups(), "pp"),
        (dims.mp_groups(), "tp-pp"),
    ]:
        assert sorted(ours) == sorted(gen.get_ranks(token)), token
    # DeepSpeed's pipeline topology sees cp x dp as its data axis (cp fastest)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp * cp)
    assert sorted(dims.dp_cp_groups()) == sorted(map(sorted, topo.get_axis_comm_lists("data")))
    for rank in range(dims.world_size):
        c, t = dims.grid_coords(rank), topo.get_coord(rank)
        assert (c.tp, c.cp + cp * c.dp, c.pp) == (t.model, t.data, t.pipe)
        assert dims.rank_of(c.tp, c.dp, c.pp, c.cp) == rank


def _mpu(rank: int, world: int) -> dict:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=1, cp=2))
    mpu = ctx.as_mpu()
    return {
        "dp_world": mpu.get_data_parallel_world_size(),
        "dp_rank": mpu.get_data_parallel_rank(),
        "group_rank": dist.get_rank(mpu.get_data_parallel_group()),
        "cp_ranks": dist.get_process_group_ranks(ctx.cp_group),
    }


@pytest.mark.slow
def test_deepspeed_mpu_reports_dp_times_cp_as_data_parallel():
    out = run_distributed(4, _mpu)  # cp 2 x dp 2
    assert [o["dp_world"] for o in out] == [4] * 4
    assert [o["dp_rank"] for o in out] == [o["group_rank"] for o in out] == [0, 1, 2, 3]
    assert [o["cp_ranks"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]


# -- layout rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.cp=4", "model.seq_len=100"], 4, "(100) must be divisible by 2 * parallel.cp = 8"),
        (["parallel.cp=2", "parallel.tp=2"], 6, "tp(2) * cp(2) * pp(1) * dp(1) != world_size(6)"),
        (
            ["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "model.seq_len=36"],
            8,
            "each context-parallel rank's 18 tokens (model.seq_len 36 / parallel.cp 2) must be divisible by "
            "parallel.tp (4)",
        ),
        (["parallel.cp=0"], 1, "parallel.cp must be > 0"),
    ],
)  # fmt: skip
def test_invalid_cp_layouts_name_the_values_and_the_fix(overrides, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_layout(
            load_config("configs/tiny.yaml", ["model.n_heads=4", "model.d_model=64", *overrides]), world
        )


def test_cp_layout_derives_dp_and_composes():
    cfg = load_config(
        "configs/tiny.yaml", ["parallel.cp=2", "parallel.tp=2", "parallel.pp=2", "zero.stage=1"]
    )
    layout = check_layout(cfg, 16)
    assert (layout.tp, layout.cp, layout.pp, layout.dp) == (2, 2, 2, 2)
    assert "cp=2" in layout.short()


# -- ring attention ----------------------------------------------------------------------------


def _ring_vs_full(rank: int, world: int, docs: bool, impl: str) -> dict[str, float]:
    group = dist.new_group(list(range(world)))
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 24 * world, 16  # GQA: two query heads per K/V head
    q = torch.randn(B, H, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    grad = torch.randn(B, H, T, D, generator=gen)
    ids = torch.sort(torch.randint(0, 4, (B, T), generator=gen), 1).values if docs else None
    full = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention_reference(*full, causal=True, doc_ids=ids)
    out.backward(grad.double())
    local = [shard_sequence(t, world, rank, dim=2).requires_grad_() for t in (q, k, v)]
    COMM_BYTES.clear()
    got = ring_attention(
        *local, group, doc_ids=None if ids is None else shard_sequence(ids, world, rank), impl=impl
    )
    got.backward(shard_sequence(grad, world, rank, dim=2))
    errors = {"out": _rel(gather_sequence(got.detach(), group, 2).double(), out.detach())}
    for name, mine, ref in zip(("dq", "dk", "dv"), local, full, strict=True):
        errors[name] = _rel(gather_sequence(mine.grad, group, 2).double(), ref.grad)
    hop = 2 * B * (T // world) * Hkv * D * 4  # one rank's K and V in fp32
    sent = {key: COMM_BYTES[key] for key in ("cp_kv", "cp_dkv", "cp_doc_ids")}
    expected = {"cp_kv": 2 * (world - 1) * hop, "cp_dkv": (world - 1) * hop,
                "cp_doc_ids": 2 * (world - 1) * B * (T // world) * 8 if docs else 0}  # fmt: skip
    return {"errors": errors, "sent": sent, "expected": expected}


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("docs", [False, True])
def test_ring_attention_equals_full_causal_attention_with_gqa_and_documents(cp, docs):
    """Output and dq/dk/dv of the split sequence equal fp64 attention of the whole sequence;
    every rank sends exactly (cp-1) K/V hops forward and backward and (cp-1) dK/dV hops."""
    for result in run_distributed(cp, _ring_vs_full, docs, "torch"):
        worst = max(result["errors"], key=result["errors"].get)
        assert result["errors"][worst] <= 2e-6, (worst, result["errors"])
        assert result["sent"] == result["expected"]


@pytest.mark.slow
def test_ring_attention_on_the_triton_kernels(monkeypatch):
    """The same ring on the Triton flash kernels (interpreter on CPU): forward with log-sum-exp,
    backward from the global output and log-sum-exp, off-diagonal blocks with Tq != Tk."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for result in run_distributed(2, _ring_vs_full, True, "triton"):
        assert max(result["errors"].values()) <= 1e-5, result["errors"]


# -- the model ---------------------------------------------------------------------------------


def _model_vs_unsplit(rank: int, world: int, family: str, dropout_p: float) -> dict[str, float]:
    ctx = ParallelContext(ParallelDims.from_world(world, cp=world))
    cfg = ModelConfig(family=family, vocab_size=V, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                      seq_len=16 * world, dropout=dropout_p, kernels="torch")  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    x, y = (torch.randint(0, V, (2, cfg.seq_len), generator=gen) for _ in range(2))
    full, split = GPT(cfg, init_seed=3), GPT(cfg, init_seed=3, cp_group=ctx.cp_group)
    torch.manual_seed(1)
    loss_full = full(x, y)
    loss_full.backward()
    torch.manual_seed(1)
    loss = split(shard_sequence(x, world, ctx.cp_rank), shard_sequence(y, world, ctx.cp_rank))
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean, group=ctx.cp_group)
    errors = {"loss": _rel(mean / world, loss_full.detach())}
    full_params = dict(full.named_parameters())
    for name, p in split.named_parameters():
        dist.all_reduce(p.grad, group=ctx.cp_group)  # what the dp x cp gradient average does
        errors[f"grad {name}"] = _rel(p.grad / world, full_params[name].grad)
    full.eval(), split.eval()
    with torch.no_grad():
        logits = gather_sequence(split(shard_sequence(x, world, ctx.cp_rank)), ctx.cp_group)
        errors["logits"] = _rel(logits, full(x))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cp,dropout_p", [(2, 0.0), (4, 0.0), (2, 0.2)])
def test_cp_model_equals_unsplit_loss_grads_and_logits(family, cp, dropout_p):
    """Mean loss over cp ranks, cp-averaged gradients and gathered logits equal the unsplit
    model (global RoPE / learned positions; dropout masks drawn at full size and sliced)."""
    for errors in run_distributed(cp, _model_vs_unsplit, family, dropout_p):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


def _model_bytes(rank: int, world: int, recompute: bool) -> dict[str, int]:
    from megalm.perf.cp import measure_ring_bytes_per_layer

    ctx = ParallelContext(ParallelDims.from_world(world, cp=world))
    cfg = ModelConfig(
        vocab_size=256, n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, seq_len=32, kernels="torch"
    )
    return measure_ring_bytes_per_layer(cfg, 3, ctx.cp_group, recompute=recompute)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True])
def test_counted_ring_bytes_per_layer_equal_the_formula(recompute):
    cfg = ModelConfig(vocab_size=256, n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, seq_len=32)
    formula = ring_bytes_per_layer(cfg, 3, 2, dtype_bytes=4, recompute="full" if recompute else "none")
    assert formula["cp_kv"] == (3 if recompute else 2) * 2 * 3 * 16 * 32 * 4  # hops x K,V x b x s/cp x w x e
    for measured in run_distributed(2, _model_bytes, recompute):
        assert measured == formula


# -- the planner -------------------------------------------------------------------------------


def test_planner_proposes_cp_for_128k_tokens_and_says_why():
    """llama-8b at 131072 tokens on 64 H100: the best layouts split sequences; every layout without
    cp is out of memory unless it recomputes every forward, which the planner shows to be slower."""
    from megalm.perf.devices import DEVICES
    from megalm.perf.memory import params_per_device
    from megalm.perf.plan import format_plan, plan

    cfg = load_config("configs/model/llama-8b.yaml").model
    p = plan(cfg, 64, DEVICES["h100"], global_batch=128, seq_len=131072)
    assert p.fits[0].layout.cp > 1
    assert not [e for e in p.fits if e.layout.cp == 1 and e.layout.recompute != "full"]
    no_cp = [e for e in p.fits if e.layout.cp == 1]
    assert all(e.step_s > p.fits[0].step_s for e in no_cp)
    text = format_plan(p)
    assert f"why cp={p.fits[0].layout.cp}: without context parallelism (cp=1)" in text
    assert "recompute=none: no layout fits" in text and "> 72.0 GB" in text
    assert "slower than #1 (it recomputes every forward)" in text
    # per rank: activations of s / cp tokens, states partitioned by ZeRO over dp x cp
    best = p.fits[0]
    assert best.states["optimizer"] == pytest.approx(
        12 * params_per_device(cfg, best.layout.tp, best.layout.pp) / (best.layout.dp * best.layout.cp)
    )


# -- training under torchrun -------------------------------------------------------------------

# 5 steps at 512 tokens; clipping active (grad_clip below the norm), so the dp x cp gradient
# average and the norm are both exercised.
CP_RUN = {
    "model.seq_len": 512,
    "training.max_steps": 5,
    "training.global_batch": 4,
    "training.micro_batch": 2,
    "training.eval_interval": 5,
    "training.sample_tokens": 0,
    "optim.warmup_steps": 2,
    "optim.grad_clip": 0.3,
}


def _records(run_dir) -> tuple[dict[int, dict], list[float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}, [r["val_loss"] for r in lines if "val_loss" in r]


def assert_same_run(ref_dir, run_dir) -> None:
    """Per-step loss and held-out loss within 1e-5 relative, gradient norm within 1e-4."""
    (ref, ref_val), (got, got_val) = _records(ref_dir), _records(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, CP_RUN["training.max_steps"] + 1))
    loss = max(abs(got[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in ref)
    norm = max(abs(got[s]["grad_norm"] - ref[s]["grad_norm"]) / ref[s]["grad_norm"] for s in ref)
    val = max(abs(a - b) / b for a, b in zip(got_val, ref_val, strict=True))
    print(f"{run_dir.name}: loss rel {loss:.2e}, grad norm rel {norm:.2e}, held-out rel {val:.2e}")
    assert loss <= 1e-5 and val <= 1e-5 and norm <= 1e-4, (loss, val, norm)


@pytest.fixture(scope="module")
def single_process(shards_dir, tmp_path_factory) -> dict[str, object]:
    """One-process runs of both families (the references every layout must equal)."""
    out = {}
    for family in ("llama", "gpt2"):
        run_dir = tmp_path_factory.mktemp(f"cp1-{family}")
        proc = run_pretrain(tiny_overrides(run_dir, shards_dir, **CP_RUN, **{"model.family": family}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[family] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "layout"),
    [
        ("llama", {"parallel.cp": 2, "zero.stage": 1}),
        ("llama", {"parallel.cp": 4, "zero.stage": 3, "training.recompute": "full"}),
        ("gpt2", {"parallel.cp": 2, "zero.stage": 2, "training.recompute": "full"}),
        ("gpt2", {"parallel.cp": 4}),
        (
            "llama",
            {"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": "true", "zero.stage": 1},
        ),
        ("llama", {"parallel.cp": 2, "parallel.pp": 2, "zero.stage": 1, "training.recompute": "full"}),
    ],
    ids=["cp2-zero1", "cp4-zero3-recompute", "gpt2-cp2-zero2-recompute", "gpt2-cp4", "tp2-sp-cp2", "pp2-cp2"],
)
def test_cp_training_equals_single_process(single_process, shards_dir, tmp_path, family, layout):
    """cp 2 and 4 for both families (GQA: 4 query / 2 K/V heads), tp 2 x cp 2 and pp 2 x cp 2 on
    4 ranks, composed with ZeRO 0-3 and activation checkpointing: the one-process losses."""
    degrees = [layout.get(k, 1) for k in ("parallel.cp", "parallel.tp", "parallel.pp")]
    overrides = tiny_overrides(tmp_path, shards_dir, **CP_RUN, **layout, **{"model.family": family})
    run_pretrain(overrides, "torchrun", degrees[0] * degrees[1] * degrees[2])
    assert_same_run(single_process[family], tmp_path)


@pytest.mark.slow
def test_cp_checkpoint_resumes_on_one_process(single_process, shards_dir, tmp_path):
    """A cp 2 x ZeRO-1 run saved at step 3 resumes on one process and continues the uninterrupted
    run: its two dp x cp ranks wrote the global tensors, the loader position ignores cp."""
    first = {**CP_RUN, "training.max_steps": 3, "parallel.cp": 2, "zero.stage": 1}
    run_pretrain(tiny_overrides(tmp_path, shards_dir, **first), "torchrun", 2)
    proc = run_pretrain(tiny_overrides(tmp_path, shards_dir, **CP_RUN))
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    (ref, ref_val), (got, got_val) = _records(single_process["llama"]), _records(tmp_path)
    for step in (4, 5):
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-5 * ref[step]["loss"], (step, got, ref)
    assert abs(got_val[-1] - ref_val[-1]) <= 1e-5 * ref_val[-1]


def test_benchmark_sweep_starts_tp_cp_pp_dp_processes(tmp_path):
    from megalm.perf.sweep import SweepSettings, parse_sweep, processes

    s = SweepSettings(config="configs/tiny.yaml", out=tmp_path, dp=2)
    rows = parse_sweep(["parallel.cp=1,2,4", "parallel.tp=2"])
    assert [processes(s, r) for r in rows] == [4, 8, 16]
