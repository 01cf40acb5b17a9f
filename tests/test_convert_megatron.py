"""Meta <-> Megatron (pretrain's dist_checkpointing format): bit-exact, and loadable by pretrain
under other layouts with the paper-reference loss."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from megatron_llama.convert.run import convert
from megatron_llama.data.batches import SyntheticTokens
from megatron_llama.local_ranks import run_processes
from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout
from tests.llama_testing import random_meta_weights, reference_logits
from tests.test_convert_meta import read_by_hand, write_by_hand

CFG = LlamaConfig(dim=128, n_layers=4, n_heads=8, vocab_size=128, multiple_of=32, max_seq_len=32)
GQA = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=64, multiple_of=32,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=32)
# Llama 3.1 in miniature (GQA, theta 5e5, scaled RoPE), and Code Llama's theta 1e6
LLAMA31 = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512,
                      multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=32,
                      rope_theta=500000.0, use_scaled_rope=True)
CODELLAMA = LlamaConfig(dim=128, n_layers=2, n_heads=8, vocab_size=80, multiple_of=32,
                        ffn_dim_multiplier=1.0, norm_eps=1e-5, max_seq_len=32, rope_theta=1e6)


@pytest.mark.parametrize("cfg, shards, tp, pp", [(CFG, 1, 1, 1), (CFG, 2, 2, 2), (CFG, 4, 4, 1),
                                                  (CFG, 8, 8, 4), (GQA, 2, 2, 2),
                                                  (LLAMA31, 2, 2, 2), (CODELLAMA, 1, 4, 2)],
                         ids=["1shard", "2shards-tp2pp2", "4shards-tp4", "8shards-tp8pp4",
                              "llama2-gqa", "llama3.1-tp2pp2", "codellama-tp4pp2"])
def test_meta_megatron_meta_bit_exact(megatron_single, tmp_path, cfg, shards, tp, pp):
    llama3 = cfg is LLAMA31  # Llama 3.x files split the embedding by rows
    weights = random_meta_weights(cfg, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "meta"), cfg, weights, shards, llama3=llama3)
    if llama3:  # its tokenizer tells the writer the generation's layout
        from megatron_llama.data.tiktoken_bpe import write_rank_file

        write_rank_file(os.path.join(src, "tokenizer.model"), [bytes([b]) for b in range(256)])
    convert(src, str(tmp_path / "mcore"), "megatron", tp=tp, pp=pp, progress=False)
    convert(str(tmp_path / "mcore"), str(tmp_path / "back"), "meta", shards=shards, progress=False)
    back, files = read_by_hand(str(tmp_path / "back"), llama3=llama3)
    assert files == shards and back.keys() == weights.keys()
    for k, v in weights.items():
        assert back[k].dtype == torch.float16 and torch.equal(back[k], v), k
    params = json.load(open(tmp_path / "back" / "params.json"))
    assert dataclasses.replace(LlamaConfig.from_dict(params, vocab_size=cfg.vocab_size),
                               max_seq_len=cfg.max_seq_len) == cfg


def test_fewer_kv_heads_than_tp_refused_in_one_line(megatron_single, tmp_path):
    from megatron_llama.errors import ConfigError

    src = write_by_hand(str(tmp_path / "meta"), GQA, random_meta_weights(GQA), 1)
    with pytest.raises(ConfigError) as e:
        convert(src, str(tmp_path / "mcore"), "megatron", tp=4, progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("n_kv_heads=2 is not divisible by TP=4: megatron-core gives each TP rank whole KV groups (legal TP: 1, 2")
    assert not (tmp_path / "mcore").exists()


def test_truncated_megatron_checkpoint_refused_before_writing(megatron_single, tmp_path):
    from megatron_llama.errors import ConfigError

    src = write_by_hand(str(tmp_path / "meta"), CFG, random_meta_weights(CFG), 1)
    convert(src, str(tmp_path / "mcore"), "megatron", progress=False)
    data = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "mcore") for f in fs
            if f.endswith(".distcp")]
    assert data
    with open(data[0], "r+b") as f:
        f.truncate(os.path.getsize(data[0]) // 2)
    # the sizes and checksums convert recorded catch it first
    with pytest.raises(ConfigError, match=r"\.distcp: [\d,]+ bytes, but the checkpoint recorded "
                                          r"[\d,]+ \(truncated\?\); refusing to convert it"):
        convert(str(tmp_path / "mcore"), str(tmp_path / "out"), "meta", progress=False)
    assert not (tmp_path / "out").exists()
    meta = next(os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "mcore") for f in fs
                if f == "megatron_llama.json")
    good = open(meta).read()
    # without recorded checksums (an older checkpoint), DCP's own sizes catch it
    with open(meta, "w") as f:
        json.dump({k: v for k, v in json.loads(good).items() if k != "files"}, f)
    with pytest.raises(ConfigError, match=r"\.distcp: \d+ bytes, the checkpoint metadata needs"):
        convert(str(tmp_path / "mcore"), str(tmp_path / "out"), "meta", progress=False)
    assert not (tmp_path / "out").exists()
    # our metadata file, then DCP's, broken in turn: one line each, nothing written
    with open(meta, "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match=r"megatron_llama\.json: not valid JSON"):
        convert(str(tmp_path / "mcore"), str(tmp_path / "out"), "meta", progress=False)
    with open(meta, "w") as f:
        f.write(good)
    with open(os.path.join(os.path.dirname(meta), ".metadata"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ConfigError, match=r"\.metadata: corrupt checkpoint metadata"):
        convert(str(tmp_path / "mcore"), str(tmp_path / "out"), "meta", progress=False)
    assert not (tmp_path / "out").exists()


def converted_logits(layout, checkpoint, tokens, cfg=CFG):
    """Logits [b, s, V] of the converted checkpoint under ``layout`` (last stage; else None),
    computed by megatron-core's forward-only schedule."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_llama.convert.megatron_checkpoint import read_metadata
    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.parallel import destroy, init_distributed, initialize

    init_distributed()
    initialize(layout)
    try:
        tconfig = to_transformer_config(cfg, layout, dtype="fp32")
        model = build_model(cfg, tconfig)[0]
        path, _ = read_metadata(checkpoint)
        model.load_state_dict(dist_checkpointing.load(
            {"model": model.sharded_state_dict()}, path)["model"])

        def step(iterator, model):
            batch = next(iterator)
            positions = torch.arange(batch.shape[1]).expand_as(batch)
            output = model(batch, positions, None)
            return output, lambda out: (out.sum() * 0, {
                "logits": tensor_parallel.gather_from_tensor_model_parallel_region(out)})

        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=model,
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
        return out[0]["logits"][..., :cfg.vocab_size].clone() if out else None
    finally:
        destroy()


def converted_worker(rank, world, workdir, tokens):
    from megatron_llama.training.loop import pretrain
    from megatron_llama.training.recipe import TrainConfig

    losses, logits = {}, {}
    logits["TP2-llama3.1"] = converted_logits(ParallelLayout(tp=2), os.path.join(workdir, "l31"),
                                              tokens % LLAMA31.vocab_size, LLAMA31)
    for name, layout in (("TP2", ParallelLayout(tp=2)), ("PP2", ParallelLayout(pp=2))):
        logits[name] = converted_logits(layout, os.path.join(workdir, "mcore"), tokens)
        cfg = TrainConfig(model=CFG, layout=layout, seq_length=32, micro_batch=1,
                          global_batch=4, train_steps=1, warmup_steps=0, dtype="fp32",
                          load_dir=os.path.join(workdir, "mcore"), seed=3)
        losses[name] = pretrain(cfg)["losses"][1]
    return losses, logits


@pytest.mark.multiprocess
def test_converted_checkpoint_logits_and_training_under_tp_and_pp(tmp_path):
    weights = random_meta_weights(CFG)
    src = write_by_hand(str(tmp_path / "meta"), CFG, weights, 2)
    workdir = str(tmp_path)
    convert(src, os.path.join(workdir, "mcore"), "megatron", tp=2, progress=False)
    weights31 = random_meta_weights(LLAMA31)
    convert(write_by_hand(str(tmp_path / "meta31"), LLAMA31, weights31, 1),
            os.path.join(workdir, "l31"), "megatron", tp=2, progress=False)
    probe = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    results = run_processes(converted_worker, 2, workdir, probe, timeout=600)
    # Llama 3.1 (GQA + scaled RoPE) converted to TP=2: the reference forward's logits
    reference31 = reference_logits(weights31, LLAMA31, probe % LLAMA31.vocab_size)
    for _, logits in results:
        err = ((logits["TP2-llama3.1"] - reference31).abs().max() / reference31.abs().max()).item()
        assert err < 1e-5, err
    # Logits of the converted model under TP=2 (both ranks gather them) and PP=2 (last stage)
    # equal the paper-reference forward on the Meta weights.
    reference = reference_logits(weights, CFG, probe)
    for rank, (_, logits) in enumerate(results):
        for name in ("TP2", "PP2"):
            if name == "PP2" and rank == 0:
                assert logits[name] is None
                continue
            got = logits[name]
            assert got.shape == reference.shape, (name, got.shape)
            err = ((got - reference).abs().max() / reference.abs().max()).item()
            assert err < 1e-5, (name, rank, err)
    losses = results[0][0]
    # The loss of pretrain's first step is the paper-reference model's loss on the same batch.
    data = SyntheticTokens(CFG.vocab_size, 32, 4, seed=3)
    tokens = torch.stack([data[i]["tokens"] for i in range(4)])
    labels = torch.stack([data[i]["labels"] for i in range(4)])
    logits = reference_logits(weights, CFG, tokens)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size),
                                                 labels.reshape(-1)).item()
    for name, loss in losses.items():
        assert abs(loss - expected) <= 1e-5 * expected, (name, loss, expected)
