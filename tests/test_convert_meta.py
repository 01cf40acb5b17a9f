"""Meta's consolidated format: merge/split by the documented table, re-sharding, validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_llama.convert.meta import MetaCheckpoint
from megatron_llama.convert.run import convert, detect_format
from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights

CFG = LlamaConfig(dim=128, n_layers=2, n_heads=8, vocab_size=96, multiple_of=32)
LLAMA2 = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=64,
                     multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5)
# How Meta splits each tensor over model-parallel files (docs/checkpoint-formats.md).
CONCAT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0,
              "w3": 0, "w2": 1}


# Llama 3.x's files split the embedding by vocabulary rows instead (VocabParallelEmbedding).
LLAMA3 = LlamaConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                     multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                     use_scaled_rope=True)


def meta_dim(key, llama3=False):
    if llama3 and key == "tok_embeddings.weight":
        return 0
    return CONCAT_DIM.get(key.split(".")[-2])  # None for norms (replicated)


def write_by_hand(directory, cfg, weights, shards, params=None, llama3=False):
    """A Meta directory written by the test itself, straight from the documented table."""
    os.makedirs(directory, exist_ok=True)
    for r in range(shards):
        part = {k: (v if meta_dim(k, llama3) is None else v.chunk(shards, meta_dim(k, llama3))[r])
                .clone() for k, v in weights.items()}
        part["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # present in Meta's files
        torch.save(part, os.path.join(directory, f"consolidated.{r:02d}.pth"))
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params or cfg.to_params_json(), f)
    return directory


def read_by_hand(directory, llama3=False):
    files = sorted(f for f in os.listdir(directory) if f.startswith("consolidated."))
    parts = [torch.load(os.path.join(directory, f), weights_only=True) for f in files]
    return {k: (parts[0][k] if meta_dim(k, llama3) is None
                else torch.cat([p[k] for p in parts], meta_dim(k, llama3)))
            for k in parts[0]}, len(files)


def test_llama3_files_split_the_embedding_by_rows_through_any_resharding(tmp_path):
    """Meta's Llama 3.x shards split tok_embeddings by vocabulary rows; the layout is read
    from the shapes and kept on writing (from a 1-file input: from the tiktoken tokenizer)."""
    from megatron_llama.data.tiktoken_bpe import write_rank_file

    weights = random_meta_weights(LLAMA3, dtype=torch.bfloat16)
    src = write_by_hand(str(tmp_path / "src"), LLAMA3, weights, 2, llama3=True)
    assert torch.load(os.path.join(src, "consolidated.00.pth"),
                      weights_only=True)["tok_embeddings.weight"].shape == (256, 128)
    ckpt = MetaCheckpoint(src)
    assert ckpt.config == LLAMA3 and ckpt.embedding_dim == 0
    assert all(torch.equal(ckpt.tensor(k), v) for k, v in weights.items())
    convert(src, str(tmp_path / "s4"), "meta", shards=4, progress=False)
    convert(str(tmp_path / "s4"), str(tmp_path / "s1"), "meta", shards=1, progress=False)
    write_rank_file(str(tmp_path / "s1" / "tokenizer.model"), [bytes([b]) for b in range(256)])
    convert(str(tmp_path / "s1"), str(tmp_path / "s2"), "meta", shards=2, progress=False)
    for name, n in (("s4", 4), ("s1", 1), ("s2", 2)):
        back, files = read_by_hand(str(tmp_path / name), llama3=True)
        assert files == n and back.keys() == weights.keys()
        assert all(torch.equal(back[k], v) for k, v in weights.items()), name
    params = json.load(open(tmp_path / "s2" / "params.json"))
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0


@pytest.mark.parametrize("cfg", [CFG, LLAMA2], ids=["llama1", "llama2-gqa"])
def test_reshard_round_trip_bit_exact(tmp_path, cfg):
    weights = random_meta_weights(cfg, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "src"), cfg, weights, 2 if cfg is LLAMA2 else 1)
    ckpt = MetaCheckpoint(src)
    assert ckpt.config == cfg and ckpt.dtype == torch.float16
    assert all(torch.equal(ckpt.tensor(k), v) for k, v in weights.items())
    previous = src
    for n in ([8, 2, 4, 1] if cfg is CFG else [1, 2]):
        out = str(tmp_path / f"s{n}")
        convert(previous, out, "meta", shards=n, progress=False)
        back, files = read_by_hand(out)
        assert files == n
        assert back.keys() == weights.keys()
        for k, v in weights.items():
            assert back[k].dtype == torch.float16 and torch.equal(back[k], v), (n, k)
        previous = out
    params = json.load(open(os.path.join(previous, "params.json")))
    assert LlamaConfig.from_dict(params, vocab_size=cfg.vocab_size) == cfg


def test_dtype_change_and_default_shards(tmp_path):
    weights = random_meta_weights(CFG, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "src"), CFG, weights, 2)
    out = str(tmp_path / "bf16")
    summary = convert(src, out, "meta", dtype="bf16", progress=False)
    assert "2 shard(s)" in summary  # unknown width: keeps the input's shard count
    back, _ = read_by_hand(out)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v.bfloat16())
               for k, v in weights.items())


def broken(tmp_path, mutate, shards=2, params=None):
    weights = random_meta_weights(CFG)
    directory = write_by_hand(str(tmp_path / "bad"), CFG, weights, shards, params)
    mutate(directory)
    return directory


def edit_shard(directory, fn, index=0):
    path = os.path.join(directory, f"consolidated.{index:02d}.pth")
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/megatron_llama_pwned",))


@pytest.mark.parametrize("case, message", [
    ("missing", "consolidated.00.pth: missing 1 tensor.*layers.1.ffn_norm.weight"),
    ("extra", "consolidated.01.pth: unexpected tensor.*extra.weight"),
    ("shape", "consolidated.00.pth: layers.0.attention.wq.weight has shape .64, 127."),
    ("shards", "shard count 2 does not match these sizes"),
    ("params", "params.json: n_layers is 3, but .*consolidated.00.pth holds 2 layers"),
    ("vocab", "params.json: vocab_size gives 100, but the weights have 96 .output.weight rows"),
    ("kv", "params.json: n_kv_heads gives 2, but the weights have 8 .layers.0.attention.wk"),
    ("ffn", "params.json: multiple_of / ffn_dim_multiplier gives 448, but the weights have 352"),
    ("field", "params.json: unknown field 'moe'"),
    ("truncated", "consolidated.01.pth: truncated or corrupt"),
    ("pickle", "consolidated.00.pth: refused: the file is not a plain tensor checkpoint"),
    ("gap", "are not consolidated.00 .. 01"),
])
def test_bad_inputs_refused_before_writing(tmp_path, case, message):
    def mutate(d):
        if case == "missing":
            edit_shard(d, lambda sd: sd.pop("layers.1.ffn_norm.weight"))
        elif case == "extra":
            edit_shard(d, lambda sd: sd.update({"extra.weight": torch.zeros(1)}), 1)
        elif case == "shape":
            edit_shard(d, lambda sd: sd.update({"layers.0.attention.wq.weight": torch.zeros(64, 127)}))
        elif case == "shards":  # two files, each holding full-size tensors
            full = random_meta_weights(CFG)
            for r in range(2):
                torch.save(full, os.path.join(d, f"consolidated.{r:02d}.pth"))
        elif case == "params":
            json.dump({"dim": 128, "n_layers": 3, "n_heads": 8, "multiple_of": 32,
                       "norm_eps": 1e-6, "vocab_size": -1}, open(os.path.join(d, "params.json"), "w"))
        elif case in ("vocab", "kv", "ffn", "field"):
            changed = {"vocab": {"vocab_size": 100}, "kv": {"n_kv_heads": 2},
                       "ffn": {"ffn_dim_multiplier": 1.3}, "field": {"moe": 1}}[case]
            json.dump(CFG.to_params_json() | changed, open(os.path.join(d, "params.json"), "w"))
        elif case == "truncated":
            path = os.path.join(d, "consolidated.01.pth")
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
        elif case == "pickle":
            torch.save({"tok_embeddings.weight": Evil()}, os.path.join(d, "consolidated.00.pth"))
        elif case == "gap":
            os.rename(os.path.join(d, "consolidated.01.pth"), os.path.join(d, "consolidated.02.pth"))

    src = broken(tmp_path, mutate)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as err:
        convert(src, str(out), "meta", shards=1, progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    assert not os.path.exists("/tmp/megatron_llama_pwned")


@pytest.mark.slow
def test_unknown_format_existing_output_and_cli(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="unknown checkpoint format"):
        detect_format(str(tmp_path / "junk"))
    src = write_by_hand(str(tmp_path / "src"), CFG, random_meta_weights(CFG), 1)
    (tmp_path / "out").mkdir()
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", "convert", "--input", src,
                             "--output", str(tmp_path / "out"), "--to", "meta", "--shards", "2",
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "already exists (pass --force" in result.stderr
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", "convert", "--input", src,
                             "--output", str(tmp_path / "out"), "--to", "meta", "--shards", "2",
                             "--force", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [".megatron-llama-output.json",
                                                    "consolidated.00.pth", "consolidated.01.pth",
                                                    "params.json"]


def test_force_replaces_only_an_earlier_convert_output(tmp_path):
    from megatron_llama.fileio import written_by

    src = write_by_hand(str(tmp_path / "src"), CFG, random_meta_weights(CFG), 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="was not written by `megatron-llama convert`; "
                                          "--force replaces only an earlier output"):
        convert(src, str(mine), "hf", force=True, progress=False)
    assert os.listdir(mine) == ["notes.txt"]  # untouched
    out = tmp_path / "out"
    for to in ("hf", "megatron", "meta"):  # each replaces the previous output, any format
        convert(src, str(out), to, force=True, progress=False)
        assert written_by(str(out)) == "convert"
