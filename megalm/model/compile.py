"""``training.compile``: ``torch.compile`` per transformer block and for the loss.

Per block, as torchtitan's ``apply_compile`` does: every block has the same code, so Dynamo
traces it once and every layer reuses the graph (parameters are graph inputs), and the parts
that differ between families or stages (embedding, head, pipeline glue) stay eager. Each
module is compiled in place (``nn.Module.compile``), so parameter names, checkpoints and
the DeepSpeed engine see the same module tree.

What composes with it, and how:

- TP/SP collectives: the autograd pairs of :mod:`megalm.parallel.mappings` call
  ``torch.library`` custom ops (``megalm::all_reduce``, ``all_gather``, ``reduce_scatter``),
  one opaque node each in the block's graph (``fullgraph=True``: no graph break).
- Triton kernels (``model.kernels``): custom ops too (``kernels/*/ops.py``).
- Activation checkpointing (``training.recompute``): the eager
  ``torch.utils.checkpoint`` around a group of blocks reruns the compiled blocks in the
  backward.
- Dropout: the masks come from PyTorch's generator, as in eager, so they (and the losses)
  stay the same under any layout (:mod:`megalm.parallel.dropout`). On CPU Inductor calls
  aten's ``bernoulli_`` anyway; on CUDA it would generate its own random numbers unless
  ``fallback_random`` is set, which :func:`compile_blocks` does (process-wide: an unfused
  random op costs little next to a layout-dependent mask).
- DeepSpeed: ZeRO 0-2 and the pipeline engine run the compiled modules as they are;
  ZeRO-3 (parameters gathered in module hooks), context parallelism (ring attention's
  point-to-point exchange) and the LSTM are refused by the config
  (:func:`megalm.config.schema.compile_problems`).
"""

from __future__ import annotations

from torch import nn

from megalm.model.gpt import LMLoss
from megalm.model.layers import Block


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` (``fullgraph=True``) every :class:`Block` and :class:`LMLoss` of
    ``model`` in place: a :class:`megalm.model.GPT`, or a pipeline stage holding some blocks
    (and, on the last stage, the loss).

    Args:
        model: the module tree to search (not compiled itself).
        backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` for checks).

    Returns:
        How many modules were compiled.
    """
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    # the loss is an attribute, not a child module (GPT.loss, PipelineModule.loss_fn)
    losses = {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, LMLoss)}
    for target in [*blocks, *losses.values()]:
        target.compile(backend=backend, fullgraph=True)
    return len(blocks) + len(losses)
