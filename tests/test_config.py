"""LlamaConfig: the paper's exact numbers, params.json, the TransformerConfig mapping, layouts."""

from __future__ import annotations

import json

import pytest

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig, to_transformer_config
from megatron_llama.model.presets import PRESETS, get_preset
from megatron_llama.parallel import ParallelLayout

PAPER = {  # preset: (exact parameters with V=32000, SwiGLU width, Meta shards)
    "7B": (6_738_415_616, 11008, 1),
    "13B": (13_015_864_320, 13824, 2),
    "33B": (32_528_943_616, 17920, 4),
    "65B": (65_285_660_672, 22016, 8),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets_exact(name):
    params, ffn, shards = PAPER[name]
    preset = PRESETS[name]
    assert preset.model.num_params() == params
    assert preset.model.ffn_hidden_size == ffn
    assert preset.model.head_dim == 128 and preset.model.vocab_size == 32000
    assert preset.meta_shards == shards
    assert preset.batch_tokens == 2048 * 2048


def test_paper_recipe_numbers():
    assert [PRESETS[n].lr for n in PAPER] == [3e-4, 3e-4, 1.5e-4, 1.5e-4]
    assert [PRESETS[n].train_tokens for n in PAPER] == [10**12, 10**12, 1.4e12, 1.4e12]
    assert get_preset("65b") is PRESETS["65B"]
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("70B")
    assert get_preset("Llama3.1-405B").name == "llama3.1-405b"
    assert get_preset("llama-65b") is PRESETS["65B"]


def test_llama2_ffn_multiplier_and_gqa():
    # Llama-2 70B: ffn_dim_multiplier applied after int(2h/3), before rounding -> 28672.
    cfg = LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                      ffn_dim_multiplier=1.3, multiple_of=4096, norm_eps=1e-5)
    assert cfg.ffn_hidden_size == 28672
    assert cfg.num_params() == 68_976_648_192  # Llama-2 70B, V=32000


FAMILY = {  # preset: (exact parameters, FFN width, KV heads, vocab, rope_theta, context)
    "llama2-7b": (6_738_415_616, 11008, 32, 32000, 1e4, 4096),
    "llama2-13b": (13_015_864_320, 13824, 40, 32000, 1e4, 4096),
    "llama2-70b": (68_976_648_192, 28672, 8, 32000, 1e4, 4096),
    "codellama-7b": (6_738_546_688, 11008, 32, 32016, 1e6, 16384),
    "llama3-8b": (8_030_261_248, 14336, 8, 128256, 5e5, 8192),
    "llama3.1-8b": (8_030_261_248, 14336, 8, 128256, 5e5, 131072),
    "llama3-70b": (70_553_706_496, 28672, 8, 128256, 5e5, 8192),
    "llama3.1-70b": (70_553_706_496, 28672, 8, 128256, 5e5, 131072),
    "llama3.1-405b": (405_853_388_800, 53248, 8, 128256, 5e5, 131072),
}

# Meta's params.json of each release, as published (the FFN width comes from these fields)
META_PARAMS = {
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                  "norm_eps": 1e-05, "vocab_size": -1},
    "llama2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                   "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "codellama-7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                     "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000,
                     "vocab_size": 32016},
    "llama3-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                  "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
                  "norm_eps": 1e-05, "rope_theta": 500000.0},
    "llama3.1-8b": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
                    "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True, "vocab_size": 128256},
    "llama3.1-405b": {"dim": 16384, "ffn_dim_multiplier": 1.2, "multiple_of": 4096,
                      "n_heads": 128, "n_kv_heads": 8, "n_layers": 126, "norm_eps": 1e-05,
                      "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_presets_exact(name):
    params, ffn, kv, vocab, theta, context = FAMILY[name]
    m = get_preset(name).model
    assert m.num_params() == params
    assert (m.ffn_hidden_size, m.num_kv_heads, m.vocab_size) == (ffn, kv, vocab)
    assert (m.rope_theta, m.max_seq_len, m.norm_eps) == (theta, context, 1e-5)
    assert m.use_scaled_rope == name.startswith("llama3.1")
    assert get_preset(name).tokenizer == ("tiktoken" if name.startswith("llama3") else
                                          "sentencepiece")


@pytest.mark.parametrize("name", list(META_PARAMS))
def test_meta_params_json_of_every_generation(tmp_path, name):
    """Each release's params.json gives its preset's architecture; writing gives the file back."""
    from megatron_llama.model.presets import published_context

    path = tmp_path / "params.json"
    path.write_text(json.dumps(META_PARAMS[name]))
    cfg = LlamaConfig.from_params_json(str(path), vocab_size=32000)
    preset = get_preset(name).model
    assert cfg.architecture() == preset.architecture()
    assert cfg.num_params() == preset.num_params()
    assert published_context(cfg) == preset.max_seq_len
    written = preset.to_params_json(context_default=published_context(preset))
    assert written == META_PARAMS[name]  # no max_seq_len: Meta's loaders reject it
    # our checkpoints' metadata keeps every field, context included
    full = preset.to_params_json(meta_style=False)
    assert LlamaConfig.from_dict(full) == preset


def test_params_json_round_trip(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32,
                                "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}))
    cfg = LlamaConfig.from_params_json(str(path), vocab_size=32000)
    assert cfg == PRESETS["7B"].model
    out = tmp_path / "out.json"
    cfg.to_params_json(str(out))
    assert json.loads(out.read_text()) == json.loads(path.read_text())
    llama2 = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.3,
                         vocab_size=100)
    llama2.to_params_json(str(out))
    assert LlamaConfig.from_params_json(str(out)) == llama2


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"dim": 64}', "missing field"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}', "tokenizer's size"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 5, "vocab_size": 10}', "not divisible"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 0, "vocab_size": 10}', "n_heads=0 must be a positive"),
    ('{"dim": "64", "n_layers": 2, "n_heads": 4, "vocab_size": 10}', "dim='64' must be a positive"),
    ('[1, 2]', "expected a JSON object, found list"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "moe_experts": 8}',
     "unknown field 'moe_experts'"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "use_scaled_rope": "yes"}',
     "use_scaled_rope='yes' must be true or false"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "rope_theta": 0}',
     "rope_theta=0 must be a positive number"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "ffn_dim_multiplier": "1.3"}',
     "ffn_dim_multiplier='1.3' must be a positive number"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3, "vocab_size": 10}',
     "n_heads=4 is not divisible by n_kv_heads=3"),
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10, "norm_eps": null}',
     "norm_eps=None must be a positive number"),
])
def test_params_json_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "params.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        LlamaConfig.from_params_json(str(path))
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_vocab_padding_keeps_32000_up_to_tp8():
    cfg = PRESETS["7B"].model
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [32000] * 4
    assert cfg.padded_vocab_size(16) == 32256
    assert LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=100).padded_vocab_size(2) == 128


def test_transformer_config_mapping():
    import torch

    cfg = PRESETS["65B"].model
    tc = to_transformer_config(cfg, ParallelLayout(tp=8, pp=4, vp=2, sp=True), dtype="bf16",
                               recompute="full", on_gpu=True)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.hidden_dropout == 0 and tc.attention_dropout == 0
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (80, 8192, 22016)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (64, 64, 128)
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (8, 4)
    assert tc.virtual_pipeline_model_parallel_size == 2 and tc.sequence_parallel
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.recompute_granularity == "full"
    assert tc.batch_p2p_comm  # GPU keeps batched p2p ...
    cpu = to_transformer_config(PRESETS["tiny"].model, ParallelLayout(pp=2, vp=2), on_gpu=False)
    assert not cpu.batch_p2p_comm  # ... gloo needs it off for interleaving (docs/megatron-core.md)
    gqa = to_transformer_config(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                            vocab_size=64), ParallelLayout(), on_gpu=False)
    assert gqa.num_query_groups == 2
    with pytest.raises(ConfigError, match="recompute"):
        to_transformer_config(cfg, ParallelLayout(), recompute="some")


@pytest.mark.parametrize("preset, layout, world, message", [
    ("33B", ParallelLayout(tp=8), 8, "n_heads=52 is not divisible by TP=8 .legal TP: 1, 2, 4"),
    ("7B", ParallelLayout(tp=3), 3, "not divisible by TP=3"),
    ("7B", ParallelLayout(pp=3), 3, "n_layers=32 is not divisible by PP"),
    ("7B", ParallelLayout(tp=8, pp=2), 24, "world size 24 is not divisible by TP\\*PP=16"),
    ("7B", ParallelLayout(sp=True), 1, "sequence parallelism needs TP > 1"),
    ("7B", ParallelLayout(vp=2), 1, "virtual pipeline stages need PP > 1"),
])
def test_impossible_layouts_refused(preset, layout, world, message):
    with pytest.raises(ConfigError, match=message) as err:
        layout.check(PRESETS[preset].model, world)
    assert "\n" not in str(err.value)


def test_batch_divisibility():
    cfg = PRESETS["7B"].model
    ParallelLayout(tp=8, pp=4).check(cfg, 2048, micro_batch=1, global_batch=2048)
    with pytest.raises(ConfigError, match="global batch 1000 is not divisible"):
        ParallelLayout(tp=8, pp=4).check(cfg, 2048, micro_batch=1, global_batch=1000)
    with pytest.raises(ConfigError, match="multiple of PP=4"):
        ParallelLayout(tp=8, pp=4, vp=2).check(cfg, 512, micro_batch=1, global_batch=96)


@pytest.mark.parametrize("layout, error", [
    (dict(pp=16), "n_layers=126 is not divisible by PP\\*VP=16 .uneven stages: "
                  "--embedding-and-loss-as-layers or --first-stage-layers"),
    (dict(pp=16, vp=3, embedding_and_loss_as_layers=True),
     "126 \\+ 2 .embedding and loss. is not divisible by PP\\*VP=48"),
    (dict(pp=16, first_stage_layers=7, embedding_and_loss_as_layers=True), "choose one"),
    (dict(pp=16, first_stage_layers=7), "leaves 119 for 15 middle stage.s. x VP=1: not an even split"),
    (dict(pp=16, first_stage_layers=7, last_stage_layers=7, vp=2),
     "first_stage_layers=7 must be a positive multiple of VP=2"),
    (dict(pp=1, first_stage_layers=7), "need PP > 1"),
    (dict(pp=16, cp=16, first_stage_layers=7, last_stage_layers=7), None),
    (dict(pp=16, vp=2, embedding_and_loss_as_layers=True), "ok"),
])
def test_uneven_pipeline_rules(layout, error):
    cfg = get_preset("llama3.1-405b").model
    lay = ParallelLayout(tp=8, **layout)
    if error == "ok":
        lay.check(cfg, 2048)
        return
    if error is None:  # Table 4's 128k layout: TP8 CP16 PP16 DP8 on 16,384 GPUs
        lay.check(cfg, 16384)
        assert lay.dp(16384) == 8 and lay.describe(16384) == (
            "TP=8 CP=16 PP=16 (first 7 / last 7 layers) DP=8")
        with pytest.raises(ConfigError, match="world size 1000 is not divisible by TP\\*PP\\*CP=2048"):
            lay.check(cfg, 1000)
        return
    with pytest.raises(ConfigError, match=error):
        lay.check(cfg)


def test_vp_with_both_end_stages_on_pp2_is_refused():
    cfg = LlamaConfig(dim=64, n_layers=8, n_heads=4, vocab_size=64)
    with pytest.raises(ConfigError, match="with --vp, uneven stages need a middle stage"):
        ParallelLayout(pp=2, vp=2, first_stage_layers=2, last_stage_layers=6).check(cfg)
    ParallelLayout(pp=2, vp=2, first_stage_layers=2).check(cfg)


def test_checkpoint_metadata_of_older_versions_is_the_same_model():
    """A checkpoint written before the family's fields existed records fewer of them."""
    from megatron_llama.model.config import model_differences

    cfg = get_preset("7B").model
    old = {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000}
    assert model_differences(old, cfg.to_params_json(meta_style=False)) == []
    assert model_differences(old, cfg.replace(rope_theta=1e6).to_params_json(
        meta_style=False)) == ["rope_theta"]


def test_release_shapes_default_to_metas_file_counts():
    from megatron_llama.convert.run import default_meta_shards

    assert default_meta_shards(get_preset("llama3.1-405b").model, 1) == 8
    assert default_meta_shards(get_preset("llama3-8b").model, 4) == 1
    assert default_meta_shards(get_preset("65B").model, 1) == 8
    assert default_meta_shards(LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=9), 2) == 2
    assert get_preset("llama3.1-405b").seq_length == 8192  # pretraining length, not 131072
    assert get_preset("llama2-7b").seq_length == 4096
