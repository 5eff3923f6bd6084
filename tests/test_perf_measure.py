"""The measuring tools the benchmark reports with: saved-activation bytes and the step timer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megalm.perf.measure import (
    CommTimer,
    StepTimer,
    alternate,
    max_rel_diff,
    saved_activation_bytes,
    throughput,
)


class _SavesWeight(torch.autograd.Function):
    """``x @ w.T`` saving the weight itself, as DeepSpeed's ZeRO-3 linear does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        return grad @ w, grad.flatten(0, -2).t() @ x.flatten(0, -2)


class _GatheredLinear(nn.Module):
    """A linear layer whose weight lives in ``shard`` and is gathered into a fresh full-size
    storage for the forward, then released (ZeRO-3's life cycle of a parameter)."""

    def __init__(self, d: int, gather: bool) -> None:
        super().__init__()
        self.gather = gather
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.shard = self.weight.detach().clone()
        if gather:
            self.weight.data = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather:
            self.weight.data = self.shard.clone()  # a new storage, as an all-gather makes
        y = torch.relu(_SavesWeight.apply(x, self.weight))
        if self.gather:
            self.weight.data = torch.empty(0)  # released; autograd holds the parameter, not the storage
        return y


@pytest.mark.parametrize("layers", [1, 3])
def test_weights_gathered_during_the_forward_are_not_activations(layers):
    """Issue 20: ZeRO-3 saves each weight while it is gathered; those storages are parameters,
    so the count equals the same model's without gathering, whatever the allocator does."""
    d, x = 32, torch.randn(4, 32, requires_grad=True)
    counts = []
    for gather in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*(_GatheredLinear(d, gather) for _ in range(layers)))
        with saved_activation_bytes(model) as saved:
            model(x).sum()
        counts.append(saved["bytes"])
    # x, then each layer's ReLU output (also the next layer's saved input): (4, d) fp32 each
    assert counts[0] == counts[1] == (layers + 1) * 4 * d * 4


def test_step_timer_measures_requested_steps_and_times_only_timed_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 16)
    timer = StepTimer(model, torch.device("cpu"), CommTimer())
    with pytest.raises(ValueError, match="no timed step"):
        timer.mean_seconds()
    phases = []
    for i in range(4):
        timer.begin(activations=i == 0, states=i == 1)
        for name in StepTimer.PHASES:
            with timer.phase(name):
                phases.append(name)
                if name == "forward":
                    loss = model(x).square().mean()
                elif name == "backward":
                    loss.backward()
                else:
                    opt.step()
                    opt.zero_grad(set_to_none=False)
        timer.end(timed=i >= 2)
    with saved_activation_bytes(model) as saved:
        model(x).square().mean()
    assert timer.activation_bytes == saved["bytes"] > 0
    n = sum(p.numel() for p in model.parameters())
    assert timer.state_bytes >= (4 + 4 + 8) * n  # fp32 weights, gradients, Adam moments
    assert timer.steps == 2 and len(phases) == 12
    means = timer.mean_seconds()
    assert set(means) == {"forward_s", "backward_s", "optimizer_s", "comm_s", "step_s"}
    assert means["comm_s"] == 0.0  # no collective ran
    assert sum(means[f"{p}_s"] for p in StepTimer.PHASES) <= means["step_s"]


def test_alternate_runs_sides_abba_and_times_only_after_the_warmup():
    order: list[tuple[str, int]] = []

    def side(name: str, seconds: float):
        def run(i: int) -> tuple[str, float]:
            order.append((name, i))
            return f"{name}{i}", seconds + i

        return run

    values, seconds = alternate({"a": side("a", 10.0), "b": side("b", 20.0)}, timed=3, warmup=1)
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert values == {"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1", "b2", "b3"]}
    assert seconds == {"a": [11.0, 12.0, 13.0], "b": [21.0, 22.0, 23.0]}  # round 0 untimed
    speed = throughput(seconds, tokens=1200, flops_per_token=1e9)
    assert speed["median_step_s"] == {"a": 12.0, "b": 22.0}
    assert speed["tokens_per_s"] == {"a": 100.0, "b": 1200 / 22.0}
    assert speed["tflops"]["a"] == pytest.approx(100.0 * 1e9 / 1e12)
    assert max_rel_diff([1.0, 2.2, 2.9], [1.0, 2.0, 3.0]) == pytest.approx(0.1)
