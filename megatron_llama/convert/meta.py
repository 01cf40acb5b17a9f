"""Meta's consolidated LLaMA format: validated, memory-mapped reading and atomic writing.

A Meta directory holds ``params.json``, ``consolidated.00.pth`` .. ``consolidated.NN.pth``
(one per model-parallel rank; 1/2/4/8 for 7B/13B/33B/65B) and usually ``tokenizer.model``.
Shard files are opened with ``torch.load(mmap=True, weights_only=True)``: nothing is read
until a tensor is used, and a pickle that would run code is refused. Every problem is found
before any output is written and reported in one line naming the file.

Tensors are merged across shards along the dimensions of docs/checkpoint-formats.md, "Shard
split dimensions" (`SPLIT_DIM`); norms are replicated. The writer streams each shard file
tensor by tensor (memory: about one full tensor), into a temporary directory renamed into
place when complete. Pages of the mapped
inputs are released as soon as they are copied, so reading a 13 GB shard does not leave
13 GB resident.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from typing import Optional

import torch

from megatron_llama.convert.source import WeightSource
from megatron_llama.convert.tensorio import TorchFileWriter, release_pages
from megatron_llama.errors import ConfigError, read_json_object
from megatron_llama.fileio import staged_directory
from megatron_llama.model.canonical import (
    full_shape,
    layer_index,
    meta_keys,
    shard_shape,
    split_dim,
)
from megatron_llama.model.config import LlamaConfig
from megatron_llama.model.presets import preset_of, published_context

SHARD_RE = re.compile(r"^consolidated\.(\d{2})\.pth$")


def load_tensor_file(path: str, allowed: tuple = (), what: str = "tensor checkpoint") -> dict:
    """A checkpoint file, memory-mapped, without running any pickled code.

    ``allowed`` lists the only extra classes the file may reference (e.g. DeepSpeed's loss
    scaler); anything else that would run code is refused with one line.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused: the file is not a plain {what} "
                          f"(loading it would run code: {str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: truncated or corrupt checkpoint file "
                          f"({str(e).splitlines()[0][:120]})") from None


def load_state_dict_file(path: str) -> dict:
    """`load_tensor_file` that also requires a flat dict of tensors (Meta's shards)."""
    sd = load_tensor_file(path)
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ConfigError(f"{path}: expected a dict of tensors")
    return sd


class MetaCheckpoint(WeightSource):
    """A validated Meta directory; `tensor(name)` gives full (merged) tensors lazily."""

    def __init__(self, directory: str):
        self.directory = directory
        params = os.path.join(directory, "params.json")
        if not os.path.isfile(params):
            raise ConfigError(f"{directory}: not a Meta checkpoint (no params.json)")
        files = sorted(f for f in os.listdir(directory) if SHARD_RE.match(f))
        if not files:
            raise ConfigError(f"{directory}: no consolidated.NN.pth files")
        expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
        if files != expected:
            raise ConfigError(f"{directory}: shard files {files} are not consolidated.00 .. "
                              f"{len(files) - 1:02d}")
        self.paths = [os.path.join(directory, f) for f in files]
        self.shards = [load_state_dict_file(p) for p in self.paths]
        first = self.shards[0]
        emb = first.get("tok_embeddings.weight")
        if emb is None:
            raise ConfigError(f"{self.paths[0]}: missing tok_embeddings.weight")
        raw = read_json_object(params)
        # Llama 3.x's files split the embedding by vocabulary rows: full-width shards
        n = len(files)
        self.embedding_dim = 0 if n > 1 and emb.dim() == 2 and emb.shape[1] == raw.get("dim") else 1
        rows = emb.shape[0] * (n if self.embedding_dim == 0 else 1)
        self.config = LlamaConfig.from_dict(raw, vocab_size=rows, source=params)
        if "max_seq_len" not in raw:  # Meta's files do not say: the release's context
            self.config.max_seq_len = published_context(self.config) or 2048
        self.dtype = emb.dtype
        self.params_path = params
        tokenizer = os.path.join(directory, "tokenizer.model")
        self.tokenizer = tokenizer if os.path.isfile(tokenizer) else None
        self._validate()
        self.description = f"Meta, {self.num_shards} shard(s)"

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def _validate(self) -> None:
        cfg, n = self.config, self.num_shards
        if cfg.n_heads % n or cfg.num_kv_heads % n:
            raise ConfigError(f"{self.directory}: {n} shards cannot split {cfg.n_heads} heads "
                              f"/ {cfg.num_kv_heads} KV heads")
        self._check_fields_against_tensors()
        wanted = set(meta_keys(cfg))
        for path, sd in zip(self.paths, self.shards):
            keys = {k for k in sd if not k.endswith("rope.freqs")}
            missing, extra = sorted(wanted - keys), sorted(keys - wanted)
            if missing:
                raise ConfigError(f"{path}: missing {len(missing)} tensor(s), e.g. {missing[0]} "
                                  "(params.json and the weights disagree?)")
            if extra:
                raise ConfigError(f"{path}: unexpected tensor(s), e.g. {extra[0]}")
            for key in wanted:
                t = sd[key]
                expect = shard_shape(key, cfg, n, self.embedding_dim)
                if tuple(t.shape) != expect:
                    hint = ""
                    dim = split_dim(key, self.embedding_dim)
                    if dim is not None and t.shape[dim] * n != full_shape(key, cfg)[dim]:
                        hint = f"; shard count {n} does not match these sizes"
                    raise ConfigError(f"{path}: {key} has shape {tuple(t.shape)}, params.json "
                                      f"implies {expect}{hint}")
                if t.dtype != self.dtype:
                    raise ConfigError(f"{path}: {key} is {t.dtype}, other tensors {self.dtype}")

    def _check_fields_against_tensors(self) -> None:
        """params.json fields that disagree with the first shard's tensors, in one line
        naming params.json and the field (before the generic shape check names a tensor)."""
        cfg, n, sd = self.config, self.num_shards, self.shards[0]
        hd = cfg.head_dim

        def rows(name: str, dim: int = 0) -> Optional[int]:
            t = sd.get(name)
            if t is None or t.dim() != 2:
                return None
            return t.shape[dim] * (n if split_dim(name, self.embedding_dim) == dim else 1)

        checks = [
            ("vocab_size", cfg.vocab_size, rows("output.weight"), "output.weight rows"),
            ("dim", cfg.dim, rows("tok_embeddings.weight", 1), "tok_embeddings.weight columns"),
            ("n_kv_heads", cfg.num_kv_heads * hd, rows("layers.0.attention.wk.weight"),
             f"layers.0.attention.wk.weight rows (n_kv_heads x head_dim {hd})"),
            ("multiple_of / ffn_dim_multiplier", cfg.ffn_hidden_size,
             rows("layers.0.feed_forward.w1.weight"), "layers.0.feed_forward.w1.weight rows"),
        ]
        for field, implied, actual, what in checks:
            if actual is not None and actual != implied and not (n > 1 and actual == n * implied):
                # (n x the full size: full tensors in every file, the shard check says so)
                got = actual // hd if field == "n_kv_heads" and actual % hd == 0 else actual
                want = cfg.num_kv_heads if field == "n_kv_heads" else implied
                raise ConfigError(f"{self.params_path}: {field} gives {want}, but the "
                                  f"weights have {got} ({what})")
        layers = sum(1 for k in sd if k.endswith(".attention.wq.weight"))
        if layers != cfg.n_layers:
            raise ConfigError(f"{self.params_path}: n_layers is {cfg.n_layers}, but "
                              f"{self.paths[0]} holds {layers} layers")

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (concatenated over shards when Meta splits it)."""
        return self.part(name, 0, 1, self.embedding_dim)

    def part(self, name: str, index: int, count: int, embedding_dim: int = 1) -> torch.Tensor:
        """Piece ``index`` of ``count`` along Meta's split dim, reading only the input shards
        that overlap it (re-sharding 8 -> 8 reads each byte once, not 8 times)."""
        dim = split_dim(name, embedding_dim)
        if dim is None:
            return _copy_out(self.shards[0][name])
        if dim != split_dim(name, self.embedding_dim):  # the other layout: via the full tensor
            return self.tensor(name).chunk(count, dim=dim)[index].clone()
        n = self.num_shards
        length = full_shape(name, self.config)[dim]
        lo, hi = index * length // count, (index + 1) * length // count
        step = length // n
        pieces = []
        for s in range(lo // step, -(-hi // step)):
            src = self.shards[s][name]
            a, b = max(lo, s * step) - s * step, min(hi, (s + 1) * step) - s * step
            pieces.append(_copy_out(src, src.narrow(dim, a, b - a)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _copy_out(mapped: torch.Tensor, view: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of (a view of) a memory-mapped tensor; its pages are then released."""
    out = (mapped if view is None else view).clone(memory_format=torch.contiguous_format)
    release_pages(mapped)
    return out


def meta_embedding_dim(source: WeightSource) -> int:
    """How Meta's files of this model split ``tok_embeddings``: as the source does when it is
    a Meta directory, by vocabulary rows (0) for Llama 3.x (a tiktoken tokenizer or a Llama 3
    shape), else by columns (1)."""
    if isinstance(source, MetaCheckpoint) and source.num_shards > 1:  # (one file: no telling)
        return source.embedding_dim
    if source.tokenizer:
        from megatron_llama.data.tokenizer import Tokenizer

        return 0 if Tokenizer(source.tokenizer).kind == "tiktoken" else 1
    preset = preset_of(source.config)
    return 0 if preset is not None and preset.tokenizer == "tiktoken" else 1


def write_meta(output: str, source: WeightSource, shards: int,
               dtype: Optional[torch.dtype] = None, force: bool = False,
               progress: bool = False) -> str:
    """Write a Meta directory with ``shards`` files from ``source`` (any reader).

    Each shard file is streamed tensor by tensor (`TorchFileWriter`), so memory holds one
    tensor, never a whole shard. Returns ``output``.
    """
    from tqdm import tqdm

    cfg = source.config
    dtype = dtype or source.dtype
    if cfg.n_heads % shards or cfg.num_kv_heads % shards:
        raise ConfigError(f"cannot write {shards} shards: {cfg.n_heads} heads / "
                          f"{cfg.num_kv_heads} KV heads are not divisible")
    keys = meta_keys(cfg)
    emb_dim = meta_embedding_dim(source)
    bar = tqdm(total=shards * cfg.n_layers, unit="layer", desc="meta", disable=not progress)
    with staged_directory(output, force, owner="convert") as tmp, bar:
        for r in range(shards):
            path = os.path.join(tmp, f"consolidated.{r:02d}.pth")
            writer = TorchFileWriter(path, [(k, shard_shape(k, cfg, shards, emb_dim), dtype)
                                            for k in keys])
            for i, key in enumerate(keys):
                writer.write(key, source.part(key, r, shards, emb_dim).to(dtype))
                if layer_index(key) is not None and (i + 1 == len(keys) or
                                                     layer_index(keys[i + 1]) != layer_index(key)):
                    bar.update(1)
            writer.close()
        cfg.to_params_json(os.path.join(tmp, "params.json"),
                           context_default=published_context(cfg) or 2048)
        if source.tokenizer:
            shutil.copyfile(source.tokenizer, os.path.join(tmp, "tokenizer.model"))
    return output
