"""Meta <-> Megatron (pretrain's dist_checkpointing format): bit-exact, and loadable by pretrain
under other layouts with the paper-reference loss."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_llama.config import LlamaConfig
from megatron_llama.convert.run import convert
from megatron_llama.launch import run_processes
from megatron_llama.parallel import ParallelLayout
from megatron_llama.training.data import SyntheticTokens
from tests.llama_testing import random_meta_weights, reference_logits
from tests.test_convert_meta import read_by_hand, write_by_hand

CFG = LlamaConfig(dim=128, n_layers=4, n_heads=8, vocab_size=128, multiple_of=32, max_seq_len=32)
GQA = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=64, multiple_of=32,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=32)


@pytest.mark.parametrize("cfg, shards, tp, pp", [(CFG, 1, 1, 1), (CFG, 2, 2, 2), (CFG, 4, 4, 1),
                                                  (CFG, 8, 8, 4), (GQA, 2, 2, 2)],
                         ids=["1shard", "2shards-tp2pp2", "4shards-tp4", "8shards-tp8pp4",
                              "llama2-gqa"])
def test_meta_megatron_meta_bit_exact(megatron_single, tmp_path, cfg, shards, tp, pp):
    weights = random_meta_weights(cfg, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "meta"), cfg, weights, shards)
    convert(src, str(tmp_path / "mcore"), "megatron", tp=tp, pp=pp, progress=False)
    convert(str(tmp_path / "mcore"), str(tmp_path / "back"), "meta", shards=shards, progress=False)
    back, files = read_by_hand(str(tmp_path / "back"))
    assert files == shards and back.keys() == weights.keys()
    for k, v in weights.items():
        assert back[k].dtype == torch.float16 and torch.equal(back[k], v), k


def first_loss_worker(rank, world, workdir):
    from megatron_llama.training.loop import pretrain
    from megatron_llama.training.recipe import TrainConfig

    losses = {}
    for name, layout in (("TP2", ParallelLayout(tp=2)), ("PP2", ParallelLayout(pp=2))):
        cfg = TrainConfig(model=CFG, layout=layout, seq_length=32, micro_batch=1,
                          global_batch=4, train_steps=1, warmup_steps=0, dtype="fp32",
                          load_dir=os.path.join(workdir, "mcore"), seed=3)
        losses[name] = pretrain(cfg)["losses"][1]
    return losses


def test_converted_checkpoint_trains_from_meta_weights_under_tp_and_pp(tmp_path):
    weights = random_meta_weights(CFG)
    src = write_by_hand(str(tmp_path / "meta"), CFG, weights, 2)
    workdir = str(tmp_path)
    convert(src, os.path.join(workdir, "mcore"), "megatron", tp=2, progress=False)
    losses = run_processes(first_loss_worker, 2, workdir, timeout=600)[0]
    # The loss of pretrain's first step is the paper-reference model's loss on the same batch.
    data = SyntheticTokens(CFG.vocab_size, 32, 4, seed=3)
    tokens = torch.stack([data[i]["tokens"] for i in range(4)])
    labels = torch.stack([data[i]["labels"] for i in range(4)])
    logits = reference_logits(weights, CFG, tokens)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size),
                                                 labels.reshape(-1)).item()
    for name, loss in losses.items():
        assert abs(loss - expected) <= 1e-5 * expected, (name, loss, expected)
