"""Hugging Face export/import: loads in transformers with the reference logits, matches
Hugging Face's own conversion script bit for bit, and round-trips exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_llama.convert.run import convert
from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_batches, random_meta_weights, reference_logits
from tests.test_convert_meta import read_by_hand, write_by_hand

transformers = pytest.importorskip("transformers")

MHA = LlamaConfig(dim=128, n_layers=2, n_heads=8, vocab_size=96, multiple_of=32, max_seq_len=64)
GQA = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=64, multiple_of=32,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=64, rope_theta=500.0)
# Llama 3.1 in miniature: GQA, theta 500000, scaled RoPE (all three frequency regimes)
LLAMA31 = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=160,
                      multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=64,
                      rope_theta=500000.0, use_scaled_rope=True)


@pytest.mark.parametrize("cfg", [MHA, GQA, LLAMA31], ids=["mha", "gqa-theta500", "llama3.1"])
def test_export_loads_in_transformers_with_reference_logits(tmp_path, cfg):
    weights = random_meta_weights(cfg)
    src = write_by_hand(str(tmp_path / "meta"), cfg, weights, 2)
    convert(src, str(tmp_path / "hf"), "hf", progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                          torch_dtype=torch.float32)
    tokens = random_batches(cfg, 1, 2, 60 if cfg.use_scaled_rope else 20)[0]["tokens"]
    with torch.no_grad():
        ours = model(tokens).logits
    expected = reference_logits(weights, cfg, tokens)
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("cfg, version, shards", [(MHA, "1", 2), (GQA, "2", 2),
                                                  (LLAMA31, "3.1", 2)],
                         ids=["llama1-2shards", "llama2-gqa", "llama3.1"])
def test_export_equals_hugging_faces_own_conversion(tmp_path, cfg, version, shards):
    from safetensors.torch import load_file
    from transformers.models.llama.convert_llama_weights_to_hf import write_model

    weights = random_meta_weights(cfg, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "meta"), cfg, weights, shards, llama3=version >= "3")
    theirs_dir = str(tmp_path / "theirs")
    write_model(theirs_dir, src, num_shards=shards, vocab_size=cfg.vocab_size,
                llama_version=version, safe_serialization=True)
    theirs = {}
    for f in os.listdir(theirs_dir):
        if f.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(theirs_dir, f)))
    # Hugging Face's script stores bf16; ask ours for the same.
    convert(src, str(tmp_path / "ours"), "hf", dtype="bf16", progress=False)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    their_config = json.load(open(os.path.join(theirs_dir, "config.json")))
    our_config = json.load(open(tmp_path / "ours" / "config.json"))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "rope_theta",
                "rope_scaling"):
        assert our_config.get(key) == their_config.get(key), key


def test_meta_hf_meta_round_trip_and_hf_to_megatron(megatron_single, tmp_path):
    weights = random_meta_weights(GQA, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "meta"), GQA, weights, 1)
    convert(src, str(tmp_path / "hf"), "hf", progress=False)
    convert(str(tmp_path / "hf"), str(tmp_path / "back"), "meta", shards=2, progress=False)
    convert(str(tmp_path / "hf"), str(tmp_path / "mcore"), "megatron", progress=False)
    convert(str(tmp_path / "mcore"), str(tmp_path / "back2"), "meta", shards=1, progress=False)
    for directory in ("back", "back2"):
        back, _ = read_by_hand(str(tmp_path / directory))
        assert back.keys() == weights.keys()
        assert all(torch.equal(back[k], v) and back[k].dtype == torch.float16
                   for k, v in weights.items())
    params = json.load(open(tmp_path / "back" / "params.json"))
    assert params["ffn_dim_multiplier"] == 1.3 and params["multiple_of"] == 32


def test_bad_hf_directories(tmp_path):
    weights = random_meta_weights(MHA)
    src = write_by_hand(str(tmp_path / "meta"), MHA, weights, 1)
    convert(src, str(tmp_path / "hf"), "hf", progress=False)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    json.dump({**config, "model_type": "gpt2"}, open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not 'llama'"):
        convert(str(tmp_path / "hf"), str(tmp_path / "x"), "meta", progress=False)
    json.dump({k: v for k, v in config.items() if k != "intermediate_size"},
              open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(ConfigError, match="config.json: missing field.s. intermediate_size"):
        convert(str(tmp_path / "hf"), str(tmp_path / "x"), "meta", progress=False)
    (tmp_path / "hf" / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="config.json: expected a JSON object"):
        convert(str(tmp_path / "hf"), str(tmp_path / "x"), "meta", progress=False)
    json.dump(config, open(tmp_path / "hf" / "config.json", "w"))
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(ConfigError, match="truncated or corrupt safetensors"):
        convert(str(tmp_path / "hf"), str(tmp_path / "x"), "meta", progress=False)
    assert not (tmp_path / "x").exists()
