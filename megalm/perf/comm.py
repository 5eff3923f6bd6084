"""Bytes a tensor-parallel transformer layer sends per training step: measured vs formula.

Formula (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", section 4.2.2): per layer and step, plain TP runs two
all-reduces in the forward (after attention and after the MLP) and two in the
backward (before them), each over the activation of ``b*s*h`` elements. Sequence
parallelism replaces every all-reduce with an all-gather plus a reduce-scatter of
the same tensor, so the volume is unchanged. With a ring algorithm one rank sends
``2 (t-1)/t * S`` bytes per all-reduce and ``(t-1)/t * S`` per all-gather or
reduce-scatter of ``S`` bytes, giving per layer and step::

    TP:       4 * 2 (t-1)/t * b*s*h * bytes
    TP + SP:  8 *   (t-1)/t * b*s*h * bytes

megalm's SP also all-reduces the gradients of the two norm gains of a layer over
TP (``2 * 2 (t-1)/t * h * bytes``, Megatron does the same after the backward);
that term is reported separately.
"""

from __future__ import annotations

import dataclasses

import torch

from megalm.config import ModelConfig
from megalm.model import GPT
from megalm.parallel.mappings import COMM_BYTES


def analytic_layer_bytes(b: int, s: int, h: int, tp: int, sp: bool, dtype_bytes: int = 4) -> dict[str, int]:
    """Bytes one rank sends for one layer, forward + backward (module docstring)."""
    act = b * s * h * dtype_bytes
    if tp == 1:
        return {"activations": 0, "norm_grads": 0}
    if sp:
        return {
            "activations": round(8 * (tp - 1) / tp * act),
            "norm_grads": round(2 * 2 * (tp - 1) / tp * h * dtype_bytes),
        }
    return {"activations": round(4 * 2 * (tp - 1) / tp * act), "norm_grads": 0}


def measure_layer_bytes(cfg: ModelConfig, group, sp: bool, batch: int) -> dict[str, int]:
    """Measured bytes per layer: a 2-layer minus a 1-layer model, one forward + backward.

    Must run on every rank of ``group`` (an initialized TP process group).
    """
    totals = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(cfg, n_layers=layers), group, sequence_parallel=sp)
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(0))
        COMM_BYTES.clear()
        model(x, x).backward()
        totals.append(dict(COMM_BYTES))
    ops = set(totals[0]) | set(totals[1])
    return {op: totals[1].get(op, 0) - totals[0].get(op, 0) for op in sorted(ops)}
