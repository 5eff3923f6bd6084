"""megalm checkpoints outside the training loop: the format, the command line, HF interop.

- ``manifest``: size + sha256 of every file of a tag, verification;
- ``tensors``: layout-free tensor files (pieces of global tensors with their boxes);
- ``writer``: writing a tag so a crash never leaves ``latest`` unloadable (sync or async);
- ``cli`` (``python -m megalm.checkpoint inspect|export|import``);
- ``hf``: ``megalm.checkpoint.hf`` converts the full (tp = 1) state dict of
  ``megalm.model.GPT`` to and from ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` directories.
  ``transformers`` is the optional extra ``megalm[hf]``, imported only when used.

Submodules are imported where used: ``import megalm.checkpoint`` loads nothing, so the
trainer's checkpoint code never pulls in ``transformers`` (import ``megalm.checkpoint.hf``
for ``to_hf``, ``from_hf``, ``export_hf``, ``import_hf``, ``HFError``).
"""
