"""Pure weight mappings (no I/O, no processes): layouts and bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from megatron_llama.model.canonical import (
    chunk_layers,
    layer_to_megatron,
    megatron_to_meta,
    meta_keys,
    meta_to_megatron,
    rope_to_half_split,
    rope_to_interleaved,
)
from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import TINY, random_meta_weights

CFG8 = LlamaConfig(dim=128, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=200, multiple_of=64)


def test_rope_permutation_orders_even_rows_first():
    w = torch.arange(2 * 8, dtype=torch.float32).reshape(2 * 8, 1)  # 2 heads of dim 8
    half = rope_to_half_split(w, 2).flatten().tolist()
    assert half == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(rope_to_interleaved(rope_to_half_split(w, 2), 2), w)


def test_qkv_rows_grouped_per_query_group_and_fc1_per_rank():
    cfg = TINY  # 4 query heads, 2 KV groups, head_dim 16
    layer = {k.split(".", 2)[2]: v for k, v in random_meta_weights(cfg).items()
             if k.startswith("layers.0.")}
    shards = layer_to_megatron(layer, cfg, tp=2)
    hd = cfg.head_dim
    q = rope_to_half_split(layer["attention.wq.weight"], cfg.n_heads)
    k = rope_to_half_split(layer["attention.wk.weight"], 2)
    for r, shard in enumerate(shards):  # TP rank r holds query group r
        qkv = shard["self_attention.linear_qkv.weight"]
        assert torch.equal(qkv[: 2 * hd], q[2 * hd * r: 2 * hd * (r + 1)])
        assert torch.equal(qkv[2 * hd: 3 * hd], k[hd * r: hd * (r + 1)])
        assert torch.equal(qkv[3 * hd:], layer["attention.wv.weight"][hd * r: hd * (r + 1)])
        f = cfg.ffn_hidden_size // 2
        fc1 = shard["mlp.linear_fc1.weight"]
        assert torch.equal(fc1[:f], layer["feed_forward.w1.weight"][f * r: f * (r + 1)])
        assert torch.equal(fc1[f:], layer["feed_forward.w3.weight"][f * r: f * (r + 1)])


@pytest.mark.parametrize("tp, pp, vp", [(tp, pp, None) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8)]
                         + [(2, 2, 2), (1, 4, 2), (8, 2, 4)])
def test_round_trip_bit_exact(tp, pp, vp):
    meta = random_meta_weights(CFG8, dtype=torch.float16)
    shards = dict(meta_to_megatron(meta, CFG8, tp, pp, vp))
    assert len(shards) == tp * pp * (vp or 1)
    emb = shards[(0, 0, 0)]["embedding.word_embeddings.weight"]
    assert emb.shape == (CFG8.padded_vocab_size(tp) // tp, CFG8.dim)
    back = megatron_to_meta(shards, CFG8, tp, pp, vp)
    assert sorted(back) == sorted(meta_keys(CFG8))
    for key, tensor in meta.items():
        assert back[key].dtype == torch.float16
        assert torch.equal(back[key], tensor), key


def test_te_names_round_trip():
    meta = random_meta_weights(TINY)
    shards = dict(meta_to_megatron(meta, TINY, 2, names="te"))
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in shards[(0, 0, 0)]
    back = megatron_to_meta(shards, TINY, 2, names="te")
    assert all(torch.equal(back[k], v) for k, v in meta.items())


def test_chunk_layers_interleaved_placement():
    # 8 layers, PP=2, VP=2: chunk size 2; rank 0 holds 0-1 and 4-5, rank 1 holds 2-3 and 6-7.
    assert {k: list(v) for k, v in chunk_layers(8, 2, 2).items()} == {
        (0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    assert list(chunk_layers(80, 8)[(3, 0)]) == list(range(30, 40))


def test_uneven_pipeline_placement_follows_megatron_core():
    """Llama 3.1 405B's 126 layers on PP=16: 7 on the first and last stages (Llama 3 paper,
    section 3.3.2), or the embedding and loss counted as layers (which allows VP)."""
    from megatron_llama.parallel import ParallelLayout

    layout = ParallelLayout(tp=8, pp=16, first_stage_layers=7, last_stage_layers=7)
    assert layout.stage_layers(126) == [7] + [8] * 14 + [7]
    chunks = chunk_layers(126, 16, counts=layout.chunk_counts(126))
    assert list(chunks[(0, 0)]) == list(range(7)) and list(chunks[(1, 0)]) == list(range(7, 15))
    assert list(chunks[(15, 0)]) == list(range(119, 126))
    # megatron-core: pass v covers [v L/V, (v+1) L/V); stage 0 takes first/V of each pass
    uneven = ParallelLayout(pp=2, vp=2, first_stage_layers=4)
    got = {k: list(v) for k, v in chunk_layers(12, 2, 2, uneven.chunk_counts(12)).items()}
    assert got == {(0, 0): [0, 1], (1, 0): [2, 3, 4, 5], (0, 1): [6, 7], (1, 1): [8, 9, 10, 11]}
    # 126 + embedding + loss = 128 = 16 stages x 2 chunks x 4: the first and last chunks
    # hold 3 transformer layers (megatron-core's offsets: v * 64 + p * 4 - 1 after the first)
    ends = ParallelLayout(tp=8, pp=16, vp=2, embedding_and_loss_as_layers=True)
    assert ends.stage_layers(126) == [7] + [8] * 14 + [7]
    chunks = chunk_layers(126, 16, 2, ends.chunk_counts(126))
    assert list(chunks[(0, 0)]) == [0, 1, 2] and chunks[(1, 0)].start == 1 * 4 - 1
    assert chunks[(0, 1)].start == 64 - 1 and chunks[(5, 1)].start == 64 + 5 * 4 - 1
    assert list(chunks[(15, 1)]) == [123, 124, 125]
    assert chunk_layers(8, 2, 2) == chunk_layers(8, 2, 2, ParallelLayout(pp=2, vp=2).chunk_counts(8))
