"""``training.compile=true``: compiled blocks and loss train to the golden (eager) numbers under
tensor parallelism and activation checkpointing, through DeepSpeed; bad combinations are one
config error (the command line's one ``error:`` line: tests/test_bad_config.py). Triton kernels
inside compiled blocks: tests/kernels/test_compile.py."""

from __future__ import annotations

import pytest
import torch

from megalm.config import ConfigError, ModelConfig, load_config
from megalm.model import GPT, Sampling, decoding, generate
from megalm.model.compile import compile_blocks
from tests.conftest import ROOT
from tests.golden import assert_matches_golden, golden_run_overrides
from tests.launching import run_pretrain

# One 2-rank run per family: tp 2 with recompute. llama: sequence parallelism (the all-gather /
# reduce-scatter pair inside its compiled blocks), ZeRO-0 (megalm measures the grad norm). gpt2:
# the all-reduce pair, biases, LayerNorm, the tied head, two blocks per checkpoint, and DeepSpeed's
# ZeRO-2 optimizer (its gradient hooks on the compiled blocks' parameters; dp = 1).
CELLS = {
    "llama": {"parallel.tp": 2, "parallel.sequence_parallel": "true", "training.recompute": "full"},
    "gpt2": {
        "parallel.tp": 2,
        "training.recompute": "full",
        "training.recompute_interval": 2,
        "zero.stage": 2,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_tp2_recompute_training_matches_golden(golden_data, tmp_path, family):
    """10 DeepSpeed steps with every block and the loss compiled (Inductor on CPU) give the golden
    eager curve: losses and held-out losses within 1e-5 relative, grad norms within 1e-4."""
    overrides = {"training.max_steps": 10, "training.sample_tokens": 0, "training.compile": "true"}
    proc = run_pretrain(
        golden_run_overrides(tmp_path, golden_data, family, **overrides, **CELLS[family]), "torchrun", 2
    )
    # 4 blocks and the loss on rank 0: compiled, not silently eager
    assert (
        "compile | torch.compile (inductor, fullgraph) of each transformer block and the loss: 5 modules"
        in proc.stdout
    )
    assert_matches_golden(tmp_path, family, range(1, 11))


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.family=lstm"], ["model.family=lstm", "training.compile=false"]),
        (["parallel.cp=2"], ["parallel.cp=2", "ring attention", "parallel.cp=1"]),
        (["zero.stage=3"], ["zero.stage=3", "hooks", "zero.stage<=2"]),
    ],
)
def test_compile_with_what_it_cannot_hold_is_one_config_error(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny.yaml", ["training.compile=true", *overrides])
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    load_config(ROOT / "configs" / "tiny.yaml", overrides)  # valid without compile


def test_decoding_with_the_kv_cache_runs_the_compiled_blocks_eager():
    """Text sampling with the cache feeds every block a new length each step: the compiled blocks
    run eager there (no retrace per step, no recompile limit), the training graph stays cached,
    and the tokens are the eager model's."""
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]  # process-wide: count from here
    start = stats["unique_graphs"]
    cfg = ModelConfig(
        family="llama", vocab_size=100, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, seq_len=32
    )
    eager, compiled = GPT(cfg, init_seed=2), GPT(cfg, init_seed=2)
    compile_blocks(compiled, backend="aot_eager")  # what is traced is the point, not the code made
    tokens = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    compiled(tokens[:, :-1], tokens[:, 1:]).backward()  # the training graph of a block and of the loss
    assert stats["unique_graphs"] == start + 2

    def greedy(model):
        with decoding(model):
            return generate(model, [[5, 9, 2], [7]], 12, cfg.seq_len, Sampling(0))

    assert greedy(compiled) == greedy(eager)
    assert stats["unique_graphs"] == start + 2
