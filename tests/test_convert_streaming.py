"""Conversion streams: tensor files written one tensor at a time, readers holding one layer,
writers asking for each layer once, and peak memory far below the checkpoint's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from megatron_llama.convert.hf import HFCheckpoint, write_hf
from megatron_llama.convert.megatron_checkpoint import (
    MegatronCheckpoint,
    write_megatron,
)
from megatron_llama.convert.meta import MetaCheckpoint, write_meta
from megatron_llama.convert.tensorio import (
    SafetensorsFile,
    SafetensorsWriter,
    TorchFileWriter,
    release_pages,
)
from megatron_llama.model.canonical import META_LAYER_KEYS, layer_index, meta_keys
from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights
from tests.test_convert_meta import write_by_hand

CFG = LlamaConfig(dim=128, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=32)


def test_tensor_files_match_torch_and_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).bfloat16(),
               "c": torch.randn(2, 3, 4), "empty": torch.zeros(0, 4)}
    layout = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    writer = TorchFileWriter(str(tmp_path / "x.pth"), layout)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    for mmap in (False, True):
        back = torch.load(tmp_path / "x.pth", weights_only=True, mmap=mmap)
        assert list(back) == list(tensors)
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
            release_pages(back[k])  # the data stays valid after its pages are dropped
            assert torch.equal(back[k], v)
    writer = SafetensorsWriter(str(tmp_path / "x.safetensors"), layout)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    theirs, ours = load_file(str(tmp_path / "x.safetensors")), SafetensorsFile(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(theirs[k], v) and torch.equal(ours.tensor(k), v), k
    # Out-of-order writes and unwritten tensors are errors, not silent garbage.
    writer = TorchFileWriter(str(tmp_path / "y.pth"), layout)
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", tensors["b"])
    with pytest.raises(ValueError, match="never written"):
        writer.close()


class Tracked(MetaCheckpoint):
    """A Meta reader that counts requests per layer and the bytes it handed out still alive."""

    def __init__(self, directory):
        super().__init__(directory)
        self.calls: dict = {}
        self.live = 0
        self.peak_live = 0

    def _track(self, t):
        nbytes = t.numel() * t.element_size()
        self.live += nbytes
        self.peak_live = max(self.peak_live, self.live)
        weakref.finalize(t, self._freed, nbytes)
        return t

    def _freed(self, nbytes):
        self.live -= nbytes

    def part(self, name, index, count, embedding_dim=1):  # tensor(name): part(name, 0, 1, ...)
        self.calls[name] = self.calls.get(name, 0) + 1
        return self._track(super().part(name, index, count, embedding_dim))


def layer_bytes(cfg, dtype_size=2):
    weights = random_meta_weights(cfg)
    return sum(weights[f"layers.0.{k}"].numel() for k in META_LAYER_KEYS) * dtype_size


def test_writers_pull_each_tensor_once_and_hold_at_most_a_layer(megatron_single, tmp_path,
                                                                capsys):
    weights = random_meta_weights(CFG, dtype=torch.float16)
    src = write_by_hand(str(tmp_path / "meta"), CFG, weights, 2)
    biggest_top = weights["tok_embeddings.weight"].numel() * 2
    for name, write in (("megatron", lambda s, out: write_megatron(out, s, progress=True)),
                        ("hf", lambda s, out: write_hf(out, s, max_shard_bytes=40_000,
                                                       progress=True)),
                        ("meta", lambda s, out: write_meta(out, s, 1, progress=True))):
        source = Tracked(src)
        write(source, str(tmp_path / f"out-{name}"))
        assert set(source.calls) == set(meta_keys(CFG)), name
        assert all(n == 1 for n in source.calls.values()), (name, source.calls)
        # At most one layer of source tensors is alive at any time (plus one top tensor).
        assert source.peak_live <= layer_bytes(CFG) + biggest_top, (name, source.peak_live)
        err = capsys.readouterr().err
        assert f"{CFG.n_layers}/{CFG.n_layers}" in err and "layer" in err, (name, err[-300:])
    # The HF export was split into several files with an index, and reads back bit-exact.
    index = json.load(open(tmp_path / "out-hf" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 3
    hf = HFCheckpoint(str(tmp_path / "out-hf"))
    assert all(torch.equal(hf.tensor(k), v) for k, v in weights.items())
    # Reading the Megatron checkpoint loads each layer once, in layer order.
    mcore = MegatronCheckpoint(str(tmp_path / "out-megatron"))
    loads = []
    original = mcore._load
    mcore._load = lambda request: loads.append(sorted({v[1] for v in request.values()}, key=str)) or original(request)
    for k in meta_keys(CFG):
        assert torch.equal(mcore.tensor(k), weights[k]), k
    layer_loads = [x[0] for x in loads if x != [None]]
    assert layer_loads == list(range(CFG.n_layers)), loads


BIG = LlamaConfig(dim=1024, n_layers=16, n_heads=8, vocab_size=8192, multiple_of=256)
SMALL = LlamaConfig(dim=1024, n_layers=1, n_heads=8, vocab_size=8192, multiple_of=256)


def _peak_rss_mb(argv):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024


def _synthetic(directory, cfg):
    from megatron_llama.model.canonical import full_shape

    os.makedirs(directory)
    keys = meta_keys(cfg)
    writer = TorchFileWriter(os.path.join(directory, "consolidated.00.pth"),
                             [(k, full_shape(k, cfg), torch.float16) for k in keys])
    for k in keys:
        writer.write(k, torch.full(full_shape(k, cfg), 0.01 * (1 + (layer_index(k) or 0)),
                                   dtype=torch.float16))
    writer.close()
    cfg.to_params_json(os.path.join(directory, "params.json"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peak_memory_stays_far_below_the_checkpoint(tmp_path):
    """A 436 MB checkpoint converts Meta -> Megatron -> Meta with a peak RSS no more than
    40% of its size above the same conversion of a 1-layer model (imports, buffers)."""
    size_mb = BIG.num_params() * 2 / 2**20
    cli = [sys.executable, "-m", "megatron_llama.cli", "convert", "--no-progress"]
    peaks = {}
    for name, cfg in (("small", SMALL), ("big", BIG)):
        meta = str(tmp_path / name)
        _synthetic(meta, cfg)
        to_mcore = _peak_rss_mb(cli + ["--input", meta, "--output", meta + "-mcore", "--to",
                                       "megatron"])
        to_meta = _peak_rss_mb(cli + ["--input", meta + "-mcore", "--output", meta + "-back",
                                      "--to", "meta"])
        peaks[name] = (to_mcore, to_meta)
    print(f"peak RSS MB (to megatron, to meta): {peaks}, checkpoint {size_mb:.0f} MB")
    back = MetaCheckpoint(str(tmp_path / "big-back"))
    assert torch.equal(back.tensor("layers.15.feed_forward.w2.weight"),
                       torch.full((1024, BIG.ffn_hidden_size), 0.16, dtype=torch.float16))
    for i, direction in enumerate(("meta -> megatron", "megatron -> meta")):
        extra = peaks["big"][i] - peaks["small"][i]
        assert extra < 0.4 * size_mb, (direction, peaks, size_mb)
