"""Checkpoints that leave megalm: Hugging Face ``transformers`` export and import.

``megalm.checkpoint.hf`` converts the full (tp = 1) state dict of ``megalm.model.GPT``
to and from ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` directories. ``transformers``
and ``safetensors`` are the optional extra ``megalm[hf]``, imported only when used.
"""

from megalm.checkpoint.hf import HFError, export_hf, from_hf, import_hf, to_hf

__all__ = ["HFError", "export_hf", "from_hf", "import_hf", "to_hf"]
