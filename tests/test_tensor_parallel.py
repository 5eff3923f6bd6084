"""Tensor and sequence parallelism equal the unsharded model (gloo, CPU)."""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model import GPT
from megalm.model.gpt import TP_PLAN
from megalm.parallel import (
    ColumnParallelLinear,
    LayoutError,
    ParallelContext,
    ParallelDims,
    RowParallelLinear,
)
from megalm.parallel.dropout import dropout
from megalm.parallel.layers import VocabParallelEmbedding
from tests.distributed import run_distributed
from tests.golden import assert_matches_golden, golden_run_overrides
from tests.launching import run_pretrain

V = 500  # pads to 512 for tp in {1, 2, 4}: the same weights at every degree


def _cfg(family: str, n_kv_heads: int, dropout_p: float = 0.0) -> ModelConfig:
    return ModelConfig(
        family=family,
        vocab_size=V,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        seq_len=16,
        dropout=dropout_p,
    )


def _gathered(p: torch.nn.Parameter, t: torch.Tensor, group) -> torch.Tensor:
    if not getattr(p, "tensor_model_parallel", False) or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, with the scale floored at 1e-4: some gradients are zero in exact
    arithmetic (a key bias shifts every score of a row alike, and softmax ignores that)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-4)).item()


def _compare_with_unsharded(rank: int, world: int, family: str) -> dict[str, float]:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=world))
    errors: dict[str, float] = {}
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, V, (3, 16), generator=gen)
    y = torch.randint(0, V, (3, 16), generator=gen)
    for n_kv in (4, 1):
        for sp in (False, True):
            for p in (0.0, 0.2):
                tag = f"kv{n_kv}-sp{int(sp)}-drop{p}"
                cfg = _cfg(family, n_kv, p)
                torch.manual_seed(0)
                full = GPT(cfg)
                torch.manual_seed(0)
                tp = GPT(cfg, ctx.tp_group, sequence_parallel=sp)
                for name, param in tp.named_parameters():  # identical initial weights
                    errors[f"{tag} init {name}"] = _rel(
                        _gathered(param, param.data, ctx.tp_group), dict(full.named_parameters())[name].data
                    )
                torch.manual_seed(1)
                loss_full = full(x, y)
                loss_full.backward()
                torch.manual_seed(1)
                loss_tp = tp(x, y)
                loss_tp.backward()
                errors[f"{tag} loss"] = _rel(loss_tp.detach(), loss_full.detach())
                full_params = dict(full.named_parameters())
                for name, param in tp.named_parameters():
                    errors[f"{tag} grad {name}"] = _rel(
                        _gathered(param, param.grad, ctx.tp_group), full_params[name].grad
                    )
                full.eval(), tp.eval()
                with torch.no_grad():
                    errors[f"{tag} logits"] = _rel(tp(x), full(x))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_matches_unsharded_forward_and_grads(tp, family):
    """Logits, loss and every gathered gradient within 1e-5 (fp32), with and without SP,
    split and replicated K/V heads, and with dropout (same seed -> same masks)."""
    for errors in run_distributed(tp, _compare_with_unsharded, family):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-5, f"{worst}: relative error {errors[worst]:.2e}"
        assert any(k.endswith("logits") for k in errors) and any(" grad " in k for k in errors)


def _sp_on_off(rank: int, world: int) -> float:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=world))
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    out = []
    for sp in (False, True):
        torch.manual_seed(0)
        model = GPT(_cfg("llama", 2, 0.1), ctx.tp_group, sequence_parallel=sp)
        torch.manual_seed(5)
        loss = model(x, x)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = out
    assert torch.equal(l0, l1) or _rel(l1, l0) <= 1e-6
    return max(_rel(a, b) for a, b in zip(g1, g0, strict=True))


@pytest.mark.slow
def test_sequence_parallel_on_off_identical_losses_and_grads():
    assert max(run_distributed(2, _sp_on_off)) <= 1e-5


def _dropout_masks(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = ParallelContext(ParallelDims.from_world(world, tp=world))
    x = torch.ones(2, 8 // world, 4)
    torch.manual_seed(11)
    sharded = dropout(x, 0.5, True, seq_group=ctx.tp_group)
    replicated = dropout(torch.ones(2, 8, 4), 0.5, True)
    return sharded, replicated


@pytest.mark.slow
def test_dropout_differs_in_sharded_and_agrees_in_replicated_regions():
    (s0, r0), (s1, r1) = run_distributed(2, _dropout_masks)
    assert not torch.equal(s0, s1)  # each rank keeps a different slice of the mask
    assert torch.equal(r0, r1)  # the replicated region gets the same mask everywhere
    torch.manual_seed(11)
    full = dropout(torch.ones(2, 8, 4), 0.5, True)
    assert torch.equal(torch.cat([s0, s1], dim=1), full)  # and together they are the TP=1 mask


def test_padded_vocabulary_is_masked_out_of_loss_and_logits():
    cfg = _cfg("llama", 2)
    assert cfg.padded_vocab(1) == 512 and cfg.padded_vocab(8) == 1024
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.embed.tok_emb.weight.shape[0] == 512
    x = torch.randint(0, V, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, V)
    torch.testing.assert_close(model(x, x), F.cross_entropy(logits.reshape(-1, V), x.reshape(-1)))


def test_grid_coordinates_match_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    for tp, pp, dp in [(2, 2, 2), (4, 1, 2), (1, 2, 4), (2, 3, 1)]:
        dims = ParallelDims(tp, pp, dp)
        topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        for rank in range(dims.world_size):
            c = topo.get_coord(rank)
            assert dims.coords(rank) == (c.model, c.data, c.pipe)
            assert dims.rank_of(c.model, c.data, c.pipe) == rank
        assert sorted(map(sorted, dims.dp_groups())) == sorted(map(sorted, topo.get_axis_comm_lists("data")))
        assert sorted(map(sorted, dims.tp_groups())) == sorted(map(sorted, topo.get_axis_comm_lists("model")))


def test_grid_coordinates_match_megatron_formula():
    # megatron-core parallel_state, order "tp-dp-pp": rank = tp + TP * (dp + DP * pp).
    dims = ParallelDims(2, 2, 2)
    assert [dims.coords(r) for r in range(8)] == [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (1, 1, 0),
        (0, 0, 1),
        (1, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
    ]


def test_layout_errors_print_every_factor():
    with pytest.raises(LayoutError, match=r"tp\(3\) \* pp\(1\) \* dp\(2\) != world_size\(8\)"):
        ParallelDims.from_world(8, tp=3)
    with pytest.raises(LayoutError, match=r"tp\(2\) \* pp\(2\) \* dp\(1\) != world_size\(6\)"):
        ParallelDims.from_world(6, tp=2, pp=2)


def test_tp_plan_matches_the_model():
    kinds = {"column": ColumnParallelLinear, "row": RowParallelLinear, "vocab": VocabParallelEmbedding}
    names = {**dict(GPT(_cfg("gpt2", 4)).named_modules()), **dict(GPT(_cfg("llama", 4)).named_modules())}
    for pattern, plan in TP_PLAN.items():
        matched = [n for n in names if fnmatch.fnmatch(n, pattern)]
        assert matched, pattern
        kind = plan.split()[0]
        for name in matched:
            if kind in kinds:
                assert isinstance(names[name], kinds[kind]), (name, plan)
            else:
                assert not isinstance(names[name], tuple(kinds.values())), (name, plan)


@pytest.mark.slow
def test_tp2_dp2_zero1_and_tp2_training_match_golden(golden_data, tmp_path):
    """10 DeepSpeed steps at TP=2 x DP=2 (ZeRO-1, sequence parallel), and TP=2 under torchrun, give the
    golden TP=1 x DP=1 numbers; clipping is active, so the TP-aware norm is exercised too."""
    ten = {"training.max_steps": 10}
    tp2dp2 = {**ten, "parallel.tp": 2, "zero.stage": 1, "parallel.sequence_parallel": "true"}
    run_pretrain(golden_run_overrides(tmp_path / "tp2dp2", golden_data, **tp2dp2), "deepspeed", 4)
    assert_matches_golden(tmp_path / "tp2dp2", "llama", range(1, 11))
    tp2 = {**ten, "parallel.tp": 2}
    run_pretrain(golden_run_overrides(tmp_path / "tp2", golden_data, **tp2), "torchrun", 2)
    assert_matches_golden(tmp_path / "tp2", "llama", range(1, 11))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tp=3"], "model.n_heads (4) must be divisible by parallel.tp (3)"),
        (
            ["parallel.tp=4", "model.n_kv_heads=3", "model.n_heads=12", "model.d_model=96"],
            "model.n_kv_heads (3) and parallel.tp (4): one must divide the other",
        ),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=63"],
            "model.seq_len (63) must be divisible by parallel.tp (2)",
        ),
        (["parallel.tp=2", "model.ffn_hidden=33"], "MLP width (33) must be divisible by parallel.tp (2)"),
    ],
)
def test_invalid_layouts_name_the_values(overrides, message):
    from megalm.config import ConfigError, load_config
    from megalm.parallel.layout import check_layout

    cfg = load_config(None, ["model.n_heads=4", "model.d_model=64", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_layout(cfg, 12)


@pytest.mark.slow
def test_world_size_mismatch_is_one_line_error_before_any_process_group(golden_data, tmp_path):
    proc = run_pretrain(golden_run_overrides(tmp_path, golden_data, **{"parallel.tp": 2}))  # a world of one
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tp(2) * pp(1) * dp(1) != world_size(1): the world size must be a multiple of tp * pp = 2 "
        "(world size from python: no launcher variables (RANK/WORLD_SIZE, SLURM_PROCID in an srun step, "
        "OMPI_COMM_WORLD_RANK/PMI_RANK) are set, so this is a world of one)"
    ]


def _layer_bytes(rank: int, world: int) -> dict[bool, dict[str, int]]:
    from megalm.perf.comm import measure_layer_bytes

    ctx = ParallelContext(ParallelDims.from_world(world, tp=world))
    cfg = ModelConfig(vocab_size=256, n_layers=1, d_model=32, n_heads=4, seq_len=16)
    return {sp: measure_layer_bytes(cfg, ctx.tp_group, sp, batch=3) for sp in (False, True)}


@pytest.mark.slow
def test_counted_layer_communication_equals_korthikanti_formula():
    from megalm.perf.comm import analytic_layer_bytes

    measured = run_distributed(2, _layer_bytes)[0]
    for sp in (False, True):
        formula = analytic_layer_bytes(3, 16, 32, 2, sp)
        assert sum(measured[sp].values()) == sum(formula.values())
    assert set(measured[False]) == {"all_reduce"}
    assert (
        measured[True]["all_gather"] == measured[True]["reduce_scatter"] == measured[False]["all_reduce"] // 2
    )
