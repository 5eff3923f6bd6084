"""megalm <-> Hugging Face ``transformers`` checkpoints (``LlamaForCausalLM``, ``GPT2LMHeadModel``).

Tensor mapping, megalm name -> HF name (``i`` = block index, ``V`` = real vocabulary):

=========================  ===================================  ==========================================
megalm (tp = 1)            llama: ``LlamaForCausalLM``           gpt2: ``GPT2LMHeadModel`` (Conv1D: ``W^T``)
=========================  ===================================  ==========================================
embed.tok_emb.weight[:V]   model.embed_tokens.weight            transformer.wte.weight
embed.pos_emb.weight       (RoPE, no table)                     transformer.wpe.weight
blocks.i.attn_norm         model.layers.i.input_layernorm       transformer.h.i.ln_1
blocks.i.attn.wq, wk, wv   ...self_attn.q_proj, k_proj, v_proj  ...attn.c_attn = [wq; wk; wv]^T (fused)
blocks.i.attn.wo           ...self_attn.o_proj                  ...attn.c_proj = wo^T
blocks.i.mlp_norm          ...post_attention_layernorm          ...ln_2
blocks.i.mlp.w1, w3, w2    ...mlp.gate_proj, up_proj, down_proj ...mlp.c_fc = w1^T, mlp.c_proj = w2^T
final_norm.norm            model.norm                           transformer.ln_f
head.proj.weight[:V]       lm_head.weight (untied only)         lm_head.weight (untied only)
=========================  ===================================  ==========================================

RoPE: megalm's ``Rotary`` rotates channel ``i`` with channel ``i + hs/2`` (rotate-half) and
repeats the frequencies as ``cat(f, f)``; that is exactly HF Llama's ``rotate_half`` and
``emb = cat(freqs, freqs)``, so q/k weights map unpermuted (the ``permute`` in transformers'
``convert_llama_weights_to_hf.py`` exists for Meta's interleaved checkpoints only). GQA: both
sides group query head ``h`` with K/V head ``h // (n_heads / n_kv_heads)`` (``repeat_interleave``).
``GPT2LMHeadModel`` has no GQA: a gpt2 model with ``n_kv_heads < n_heads`` is exported with its
K/V heads repeated to ``n_heads`` (the same function; it imports back as multi-head attention).

The vocabulary padding of megalm (``ModelConfig.padded_vocab``) is sliced off on export and
re-added as zero rows on import. ``transformers``, ``safetensors`` and ``huggingface_hub``
are imported lazily (the ``megalm[hf]`` extra).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from data_tools.train_tokenizer import EOS, PAD
from megalm.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
GPT2_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")  # both are gelu(x, approximate="tanh")
# Buffers older HF checkpoints carry that are not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# Per-block names: megalm suffix -> (HF suffix, how). how: "copy", or "t" (transposed, GPT-2 Conv1D).
LLAMA_BLOCK = {
    "attn_norm.weight": ("input_layernorm.weight", "copy"),
    "attn.wq.weight": ("self_attn.q_proj.weight", "copy"),
    "attn.wk.weight": ("self_attn.k_proj.weight", "copy"),
    "attn.wv.weight": ("self_attn.v_proj.weight", "copy"),
    "attn.wo.weight": ("self_attn.o_proj.weight", "copy"),
    "mlp_norm.weight": ("post_attention_layernorm.weight", "copy"),
    "mlp.w1.weight": ("mlp.gate_proj.weight", "copy"),
    "mlp.w3.weight": ("mlp.up_proj.weight", "copy"),
    "mlp.w2.weight": ("mlp.down_proj.weight", "copy"),
}
GPT2_BLOCK = {
    "attn_norm.weight": ("ln_1.weight", "copy"),
    "attn_norm.bias": ("ln_1.bias", "copy"),
    "attn.wo.weight": ("attn.c_proj.weight", "t"),
    "attn.wo.bias": ("attn.c_proj.bias", "copy"),
    "mlp_norm.weight": ("ln_2.weight", "copy"),
    "mlp_norm.bias": ("ln_2.bias", "copy"),
    "mlp.w1.weight": ("mlp.c_fc.weight", "t"),
    "mlp.w1.bias": ("mlp.c_fc.bias", "copy"),
    "mlp.w2.weight": ("mlp.c_proj.weight", "t"),
    "mlp.w2.bias": ("mlp.c_proj.bias", "copy"),
}


class HFError(ValueError):
    """A config, state dict or directory that cannot be converted; the message names it and the fix."""


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise HFError("HF export/import needs transformers: pip install 'megalm[hf]'") from e
    return transformers


def _plan(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(megalm name, HF name, how) for every tensor but GPT-2's fused c_attn.

    how: ``copy``; ``t`` (transpose); ``vocab`` (rows sliced to / padded from the real vocabulary).
    """
    llama = cfg.family == "llama"
    pre, block, layers = (
        ("model.", LLAMA_BLOCK, "model.layers") if llama else ("transformer.", GPT2_BLOCK, "transformer.h")
    )
    plan = [("embed.tok_emb.weight", pre + ("embed_tokens.weight" if llama else "wte.weight"), "vocab")]
    if not llama:
        plan.append(("embed.pos_emb.weight", "transformer.wpe.weight", "copy"))
    for i in range(cfg.n_layers):
        plan += [(f"blocks.{i}.{m}", f"{layers}.{i}.{h}", how) for m, (h, how) in block.items()]
    norm = ["weight"] if llama else ["weight", "bias"]
    plan += [(f"final_norm.norm.{p}", pre + ("norm." if llama else "ln_f.") + p, "copy") for p in norm]
    if not cfg.tied:
        plan.append(("head.proj.weight", "lm_head.weight", "vocab"))
    return plan


def _qkv_names(i: int) -> list[tuple[list[str], str]]:
    """GPT-2's fused attention input: ([megalm wq, wk, wv names], HF c_attn name), weight then bias."""
    return [
        ([f"blocks.{i}.attn.{w}.{p}" for w in ("wq", "wk", "wv")], f"transformer.h.{i}.attn.c_attn.{p}")
        for p in ("weight", "bias")
    ]


def _check_keys(have: set[str], want: set[str], what: str, optional: set[str] = frozenset()) -> None:
    missing = sorted(want - have)
    extra = sorted(k for k in have - want - optional if not k.endswith(IGNORED_SUFFIXES))
    if missing or extra:
        raise HFError(
            f"{what} does not match the model config: missing {_first(missing)}, unexpected {_first(extra)}; "
            "pass the full (tp=1) state dict of the model this config describes"
        )


def _first(names: list[str], n: int = 5) -> str:
    return str(names[:n]) + ("..." if len(names) > n else "")


def _expand_kv(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(n_kv * hs, ...) -> (n_heads * hs, ...): each K/V head repeated for its query-head group."""
    n_kv = cfg.n_kv_heads or cfg.n_heads
    hs = cfg.d_model // cfg.n_heads
    return w.reshape(n_kv, hs, *w.shape[1:]).repeat_interleave(cfg.n_heads // n_kv, dim=0).flatten(0, 1)


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The ``LlamaConfig`` / ``GPT2Config`` arguments describing megalm model ``cfg``."""
    tied = cfg.tied
    if cfg.family == "llama":
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_size,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "head_dim": cfg.d_model // cfg.n_heads,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.seq_len,
            "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": tied,
        }
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_size,
        "activation_function": GPT2_ACTIVATIONS[0],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
    }


def to_hf(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, token_ids: dict[str, int] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """megalm's full state dict -> (``LlamaConfig`` | ``GPT2Config``, HF state dict).

    Args:
        state_dict: ``GPT(cfg).state_dict()`` at tp = 1 (vocabulary rows padded to any size >= V).
        cfg: its model config.
        token_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for the HF config
            (unset ones are ``None``, not the HF classes' defaults, which index other vocabularies).

    Returns:
        The config object and a state dict of contiguous tensors in the input dtype, real
        vocabulary only (tied heads are left out, as ``save_pretrained`` does).
    """
    if cfg.family not in ARCHITECTURES:
        raise HFError(f"model.family={cfg.family} has no transformers equivalent; export llama or gpt2")
    if cfg.vocab_size <= 0:
        raise HFError("model.vocab_size must be > 0 to export (it is filled in from the tokenizer)")
    plan = _plan(cfg)
    fused = [] if cfg.family == "llama" else [f for i in range(cfg.n_layers) for f in _qkv_names(i)]
    _check_keys(set(state_dict), {m for m, _, _ in plan} | {n for f in fused for n in f[0]}, "state dict")
    V = cfg.vocab_size
    out: dict[str, torch.Tensor] = {}
    for m, h, how in plan:
        t = state_dict[m]
        if how == "vocab" and t.size(0) < V:
            raise HFError(f"{m} has {t.size(0)} rows, fewer than model.vocab_size={V}")
        out[h] = t[:V].clone() if how == "vocab" else t.t().contiguous() if how == "t" else t.contiguous()
    for (q, k, v), h in fused:
        qkv = torch.cat([state_dict[q], _expand_kv(state_dict[k], cfg), _expand_kv(state_dict[v], cfg)])
        out[h] = qkv.t().contiguous() if qkv.dim() == 2 else qkv  # (C, 3C) Conv1D weight, or (3C,) bias
    transformers = _transformers()
    kind = transformers.LlamaConfig if cfg.family == "llama" else transformers.GPT2Config
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None} | (token_ids or {})
    config = kind(**hf_config_kwargs(cfg), **ids, architectures=[ARCHITECTURES[cfg.family]])
    config.dtype = next(iter(out.values())).dtype
    return config, out


def _family(c: dict[str, Any]) -> str:
    arch = c.get("architectures") or []
    for family, name in ARCHITECTURES.items():
        if name in arch or c.get("model_type") == family:
            return family
    raise HFError(
        f"unsupported HF model (model_type {c.get('model_type')!r}, architectures {arch}); "
        "megalm imports LlamaForCausalLM and GPT2LMHeadModel"
    )


def _rope_theta(c: dict[str, Any]) -> float:
    """RoPE base from a v4 (``rope_theta``, ``rope_scaling``) or v5 (``rope_parameters``) config."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise HFError(f"RoPE scaling {scaling} is not supported by megalm's Rotary; import an unscaled model")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _llama_model_config(c: dict[str, Any]) -> ModelConfig:
    C, nh = c["hidden_size"], c["num_attention_heads"]
    unsupported = {
        "hidden_act": c.get("hidden_act", "silu") != "silu",
        "attention_bias": c.get("attention_bias", False),
        "mlp_bias": c.get("mlp_bias", False),
        "head_dim": c.get("head_dim") not in (None, C // nh),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise HFError(
            f"LlamaForCausalLM with {', '.join(f'{k}={c.get(k)!r}' for k in bad)} has no megalm equivalent"
        )
    n_kv = c.get("num_key_value_heads") or nh
    return ModelConfig(
        family="llama",
        vocab_size=c["vocab_size"],
        n_layers=c["num_hidden_layers"],
        d_model=C,
        n_heads=nh,
        n_kv_heads=0 if n_kv == nh else n_kv,
        ffn_hidden=c["intermediate_size"],
        seq_len=c["max_position_embeddings"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(c),
        init_std=c.get("initializer_range", 0.02),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def _gpt2_model_config(c: dict[str, Any]) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    if (
        act not in GPT2_ACTIVATIONS
        or c.get("scale_attn_by_inverse_layer_idx")
        or not c.get("scale_attn_weights", True)
    ):
        raise HFError(
            f"GPT2LMHeadModel with activation_function={act!r}, scale_attn_weights="
            f"{c.get('scale_attn_weights', True)}, scale_attn_by_inverse_layer_idx="
            f"{c.get('scale_attn_by_inverse_layer_idx')} has no megalm equivalent "
            "(megalm needs a tanh GELU and 1/sqrt(hs) scores)"
        )
    C = c["n_embd"]
    return ModelConfig(
        family="gpt2",
        vocab_size=c["vocab_size"],
        n_layers=c["n_layer"],
        d_model=C,
        n_heads=c["n_head"],
        ffn_hidden=c.get("n_inner") or 4 * C,
        seq_len=c["n_positions"],
        dropout=float(c.get("resid_pdrop", 0.0)),
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        init_std=c.get("initializer_range", 0.02),
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def _with_family_defaults(cfg: ModelConfig) -> ModelConfig:
    """Write ``ffn_hidden`` and ``tie_embeddings`` as 0 / None where they equal the family default,
    so an exported-then-imported config reads like the original."""
    default = dataclasses.replace(cfg, ffn_hidden=0, tie_embeddings=None)
    return dataclasses.replace(
        cfg,
        ffn_hidden=0 if default.ffn_size == cfg.ffn_hidden else cfg.ffn_hidden,
        tie_embeddings=None if default.tied == cfg.tie_embeddings else cfg.tie_embeddings,
    )


def from_hf(
    config: Any, hf_state_dict: dict[str, torch.Tensor], tp: int = 1
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(HF config, HF state dict) -> (megalm ``ModelConfig``, full megalm state dict).

    Args:
        config: a ``transformers.PretrainedConfig`` or its ``config.json`` dict.
        hf_state_dict: the checkpoint's tensors (``transformer.`` prefix optional for GPT-2).
        tp: pad the vocabulary rows with zeros to ``cfg.padded_vocab(tp)``.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    family = _family(c)
    try:  # ModelConfig checks its own shape (megalm/config/schema.py)
        cfg = _with_family_defaults(_llama_model_config(c) if family == "llama" else _gpt2_model_config(c))
    except ValueError as e:
        raise HFError(f"the HF config converts to an invalid megalm model: {e}") from e
    state = hf_state_dict
    if family == "gpt2":  # older checkpoints (the hub's gpt2) have no "transformer." prefix
        state = {
            k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
            for k, v in state.items()
        }
    plan = _plan(cfg)
    fused = [] if family == "llama" else [f for i in range(cfg.n_layers) for f in _qkv_names(i)]
    tied_head = {"lm_head.weight"} if cfg.tied else set()
    _check_keys(set(state), {h for _, h, _ in plan} | {h for _, h in fused}, "HF state dict", tied_head)
    Vp = cfg.padded_vocab(tp)
    sd: dict[str, torch.Tensor] = {}
    for m, h, how in plan:
        t = state[h]
        if how == "vocab":
            t = torch.cat([t, t.new_zeros(Vp - t.size(0), *t.shape[1:])])
        sd[m] = t.t().contiguous() if how == "t" else t.contiguous()
    for names, h in fused:
        qkv = state[h].t() if state[h].dim() == 2 else state[h]  # (3C, C) or (3C,)
        for name, part in zip(names, qkv.chunk(3), strict=True):
            sd[name] = part.contiguous()
    return cfg, sd


def _update_json(path: Path, **updates: Any) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | updates, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(tokenizer_json: str | Path, out: Path, cfg: ModelConfig) -> dict[str, int]:
    """Write tokenizer.json / tokenizer_config.json that ``AutoTokenizer`` loads; return the special ids.

    megalm separates documents with ``EOS`` and prepends nothing, so EOS also serves as
    BOS (as in GPT-2) and ``<|pad|>`` pads.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    if not path.is_file():
        raise HFError(f"tokenizer file '{path}' not found; pass the run's tokenizer.json (data manifest)")
    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size() != cfg.vocab_size:
        raise HFError(
            f"tokenizer {path} has {tok.get_vocab_size()} tokens but model.vocab_size is {cfg.vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    eos = EOS if tok.token_to_id(EOS) is not None else None
    pad = PAD if tok.token_to_id(PAD) is not None else None
    fast = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=pad, model_max_length=cfg.seq_len
    )
    fast.save_pretrained(out)
    # transformers 5 names the class TokenizersBackend; the v4 name loads under both.
    _update_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    ids = {"bos_token_id": tok.token_to_id(EOS), "eos_token_id": tok.token_to_id(EOS)}
    ids["pad_token_id"] = tok.token_to_id(PAD)
    return {k: v for k, v in ids.items() if v is not None}


def export_hf(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_json: str | Path,
    out_dir: str | Path,
    max_shard_bytes: float = 5e9,
) -> Path:
    """Write a directory ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load.

    Files: ``config.json``, ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors``
    with ``model.safetensors.index.json`` above ``max_shard_bytes``, split by
    ``huggingface_hub.save_torch_state_dict``), ``tokenizer.json``, ``tokenizer_config.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    token_ids = _save_tokenizer(tokenizer_json, out, cfg)
    config, tensors = to_hf(state_dict, cfg, token_ids)
    config.save_pretrained(out)
    if cfg.family == "llama":  # readers of transformers-4 configs look for rope_theta at the top level
        _update_json(out / "config.json", rope_theta=cfg.rope_theta)
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(tensors, out, max_shard_size=int(max_shard_bytes))
    return out


def load_safetensors_dir(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise HFError(
            f"no model.safetensors or model.safetensors.index.json in '{hf_dir}'; re-save the model "
            "with save_pretrained(dir, safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(hf_dir / name))
    return state


def import_hf(hf_dir: str | Path, tp: int = 1) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """A local HF directory -> (``ModelConfig``, full megalm state dict, its ``tokenizer.json`` or None).

    The vocabulary rows are zero-padded to ``cfg.padded_vocab(tp)``; tensors keep the
    checkpoint's dtype. Needs ``safetensors``, not ``transformers``.
    """
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise HFError(f"'{d}' has no config.json; pass a directory written by save_pretrained or export")
    cfg, sd = from_hf(json.loads((d / "config.json").read_text()), load_safetensors_dir(d), tp)
    tok = d / "tokenizer.json"
    return cfg, sd, tok if tok.is_file() else None
