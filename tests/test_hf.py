"""HF export/import: transformers loads what megalm writes and computes the same logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from data_tools.train_tokenizer import EOS, PAD
from megalm.checkpoint.hf import HFError, export_hf, from_hf, import_hf, load_safetensors_dir, to_hf
from megalm.config import ModelConfig
from megalm.model import GPT

# (family, n_kv_heads, tie_embeddings): GQA for both families (gpt2 exports its K/V heads
# repeated, GPT2LMHeadModel has no GQA), each family with its non-default tying too.
CASES = [
    ("llama", 2, None),
    ("llama", 0, True),
    ("gpt2", 0, None),
    ("gpt2", 2, False),
]


def tiny_config(tokenizer_path, family: str, n_kv_heads: int = 0, tie=None) -> ModelConfig:
    """vocab_multiple 96 pads the 512-token vocabulary to 576 rows, so export slices them off;
    a RoPE base other than the default checks that it is carried over."""
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        seq_len=32,
        tie_embeddings=tie,
        rope_theta=50_000.0 if family == "llama" else ModelConfig.rope_theta,
        vocab_multiple=96,
        kernels="torch",
    )


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose norm gains and biases are not 1 / 0, so their mapping is tested too."""
    model = GPT(cfg, init_seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def hf_logits(out_dir, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=tokens).logits


@pytest.mark.parametrize("family,n_kv_heads,tie", CASES)
def test_exported_logits_match_transformers(tokenizer_path, tmp_path, family, n_kv_heads, tie):
    cfg = tiny_config(tokenizer_path, family, n_kv_heads, tie)
    model = perturbed_model(cfg)
    export_hf(model.state_dict(), cfg, tokenizer_path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]]
    assert config["vocab_size"] == cfg.vocab_size  # padding sliced off
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    theirs = hf_logits(tmp_path, tokens)
    assert theirs.shape == ours.shape == (2, cfg.seq_len, cfg.vocab_size)
    diff = (ours - theirs).abs().max().item()
    print(f"{family} n_kv_heads={n_kv_heads} tie={tie}: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


def test_exported_tokenizer_encodes_like_megalm(tokenizer_path, tmp_path):
    cfg = tiny_config(tokenizer_path, "llama", 2)
    export_hf(GPT(cfg, init_seed=0).state_dict(), cfg, tokenizer_path, tmp_path)
    ours = Tokenizer.from_file(str(tokenizer_path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [
        "def main(argv):\n    return 0\n",
        "  leading spaces, tabs\tand unicode: λ → ü 漢字 🙂",
        f"two documents{EOS}joined by the separator",
        "",
    ]
    for text in texts:
        ids = ours.encode(text).ids
        assert theirs(text)["input_ids"] == ids  # adds no BOS/EOS, like megalm's tokenizer
        assert theirs.encode(text, add_special_tokens=False) == ids
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert theirs.eos_token == theirs.bos_token == EOS and theirs.pad_token == PAD
    assert theirs.eos_token_id == ours.token_to_id(EOS) and len(theirs) == cfg.vocab_size
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == ours.token_to_id(EOS) and config["pad_token_id"] == ours.token_to_id(PAD)


@pytest.mark.parametrize("family,n_kv_heads,tie", [c for c in CASES if not (c[0] == "gpt2" and c[1])])
def test_export_then_import_restores_config_and_weights(tokenizer_path, tmp_path, family, n_kv_heads, tie):
    cfg = tiny_config(tokenizer_path, family, n_kv_heads, tie)
    model = perturbed_model(cfg)
    export_hf(model.state_dict(), cfg, tokenizer_path, tmp_path)
    imported, sd, tok = import_hf(tmp_path)
    assert dataclasses.replace(imported, vocab_multiple=96, kernels="torch") == cfg
    assert tok == tmp_path / "tokenizer.json"
    V, Vp = cfg.vocab_size, imported.padded_vocab()
    original = model.state_dict()
    assert set(sd) == set(original)
    for name, t in sd.items():
        if t.size(0) == Vp and name in ("embed.tok_emb.weight", "head.proj.weight"):
            assert torch.equal(t[:V], original[name][:V]) and not t[V:].any(), name  # zero padding
        else:
            assert torch.equal(t, original[name]), name
    again = GPT(imported, init_seed=1).eval()
    again.load_state_dict(sd)
    tokens = torch.randint(0, V, (2, cfg.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=1e-5)


def test_gpt2_gqa_exports_as_equivalent_multi_head_attention(tokenizer_path, tmp_path):
    cfg = tiny_config(tokenizer_path, "gpt2", 2)
    model = perturbed_model(cfg)
    export_hf(model.state_dict(), cfg, tokenizer_path, tmp_path)
    imported, sd, _ = import_hf(tmp_path)
    assert imported.n_kv_heads == 0  # K/V heads repeated to n_heads
    mha = GPT(imported, init_seed=0).eval()
    mha.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        torch.testing.assert_close(mha(tokens), model(tokens), rtol=0, atol=1e-5)


def hf_native_dir(tmp_path, tokenizer_path, family: str, dtype: torch.dtype):
    """A directory written by transformers itself (its own random init), with our tokenizer."""
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
    else:
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path), eos_token=EOS).save_pretrained(
        tmp_path
    )
    return tmp_path


@pytest.mark.parametrize(
    "family,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)]
)
def test_import_then_export_is_byte_identical(tokenizer_path, tmp_path, family, dtype):
    src = hf_native_dir(tmp_path / "hf", tokenizer_path, family, dtype)
    cfg, sd, tok = import_hf(src)
    assert cfg.family == family and tok is not None
    assert sd["embed.tok_emb.weight"].size(0) == cfg.padded_vocab()
    export_hf(sd, cfg, tok, tmp_path / "out")
    a, b = load_safetensors_dir(src), load_safetensors_dir(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype, name
        assert a[name].shape == b[name].shape, name
        assert (
            a[name].contiguous().view(torch.uint8).numpy().tobytes()
            == b[name].view(torch.uint8).numpy().tobytes()
        )


def test_sharded_export_loads_in_transformers_and_imports(tokenizer_path, tmp_path):
    cfg = tiny_config(tokenizer_path, "llama", 2)
    model = perturbed_model(cfg)
    export_hf(model.state_dict(), cfg, tokenizer_path, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len))
    with torch.no_grad():
        assert (hf_logits(tmp_path, tokens) - model(tokens)).abs().max().item() < 1e-4
    _, sd, _ = import_hf(tmp_path)
    assert torch.equal(sd["blocks.1.mlp.w2.weight"], model.state_dict()["blocks.1.mlp.w2.weight"])


def test_bad_inputs_name_the_problem(tokenizer_path, tmp_path):
    cfg = tiny_config(tokenizer_path, "llama", 2)
    sd = GPT(cfg, init_seed=0).state_dict()
    del sd["blocks.1.attn.wk.weight"]
    with pytest.raises(HFError, match=r"missing \['blocks.1.attn.wk.weight'\]"):
        to_hf(sd, cfg)
    with pytest.raises(HFError, match="model.family=lstm has no transformers equivalent"):
        to_hf(sd, dataclasses.replace(cfg, family="lstm"))
    wrong_vocab = dataclasses.replace(cfg, vocab_size=cfg.vocab_size - 1)
    with pytest.raises(
        HFError, match=f"has {cfg.vocab_size} tokens but model.vocab_size is {cfg.vocab_size - 1}"
    ):
        export_hf(GPT(wrong_vocab, init_seed=0).state_dict(), wrong_vocab, tokenizer_path, tmp_path)
    config, tensors = to_hf(GPT(cfg, init_seed=0).state_dict(), cfg)
    scaled = config.to_dict() | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(HFError, match="RoPE scaling"):
        from_hf(scaled, tensors)
    with pytest.raises(HFError, match="unsupported HF model"):
        from_hf({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, tensors)
    with pytest.raises(HFError, match="no config.json"):
        import_hf(tmp_path / "nowhere")
