"""Meta's consolidated LLaMA format: validated, memory-mapped reading and atomic writing.

A Meta directory holds ``params.json``, ``consolidated.00.pth`` .. ``consolidated.NN.pth``
(one per model-parallel rank; 1/2/4/8 for 7B/13B/33B/65B) and usually ``tokenizer.model``.
Shard files are opened with ``torch.load(mmap=True, weights_only=True)``: nothing is read
until a tensor is used, and a pickle that would run code is refused. Every problem is found
before any output is written and reported in one line naming the file.

Tensors are merged across shards by the table in LLAMA_FACTS.md (`SPLIT_DIM`); norms are
replicated. The writer produces one shard at a time (memory: one output shard plus one full
tensor), into a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from typing import Callable, Iterable, Optional

import torch

from megatron_llama.config import ConfigError, LlamaConfig
from megatron_llama.convert.canonical import META_LAYER_KEYS, meta_keys

# Dimension along which Meta splits each tensor across model-parallel shards (None: copied).
SPLIT_DIM = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
             "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
             "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
             "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}
SHARD_RE = re.compile(r"^consolidated\.(\d{2})\.pth$")


def split_dim(name: str) -> Optional[int]:
    """Meta's split dimension for a full key like ``layers.3.attention.wq.weight``."""
    suffix = name.split(".", 2)[2] if name.startswith("layers.") else name
    return SPLIT_DIM[suffix]


def full_shape(name: str, cfg: LlamaConfig) -> tuple[int, ...]:
    """Unsharded shape of a Meta tensor for ``cfg``."""
    d, hd, f, v = cfg.dim, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    suffix = name.split(".", 2)[2] if name.startswith("layers.") else name
    return {"tok_embeddings.weight": (v, d), "output.weight": (v, d), "norm.weight": (d,),
            "attention.wq.weight": (cfg.n_heads * hd, d),
            "attention.wk.weight": (cfg.num_kv_heads * hd, d),
            "attention.wv.weight": (cfg.num_kv_heads * hd, d),
            "attention.wo.weight": (d, cfg.n_heads * hd),
            "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d),
            "feed_forward.w2.weight": (d, f),
            "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}[suffix]


def shard_shape(name: str, cfg: LlamaConfig, shards: int) -> tuple[int, ...]:
    shape = list(full_shape(name, cfg))
    dim = split_dim(name)
    if dim is not None:
        shape[dim] //= shards
    return tuple(shape)


def load_tensor_file(path: str) -> dict:
    """A state dict file, memory-mapped, without running any pickled code."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused: the file is not a plain tensor checkpoint "
                          f"(loading it would run code: {str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{path}: truncated or corrupt checkpoint file "
                          f"({str(e).splitlines()[0][:120]})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ConfigError(f"{path}: expected a dict of tensors")
    return sd


class MetaCheckpoint:
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
        self.shards = [load_tensor_file(p) for p in self.paths]
        first = self.shards[0]
        emb = first.get("tok_embeddings.weight")
        if emb is None:
            raise ConfigError(f"{self.paths[0]}: missing tok_embeddings.weight")
        self.config = LlamaConfig.from_params_json(params, vocab_size=emb.shape[0])
        self.dtype = emb.dtype
        tokenizer = os.path.join(directory, "tokenizer.model")
        self.tokenizer = tokenizer if os.path.isfile(tokenizer) else None
        self._validate()

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def _validate(self) -> None:
        cfg, n = self.config, self.num_shards
        if cfg.n_heads % n or cfg.num_kv_heads % n:
            raise ConfigError(f"{self.directory}: {n} shards cannot split {cfg.n_heads} heads "
                              f"/ {cfg.num_kv_heads} KV heads")
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
                expect = shard_shape(key, cfg, n)
                if tuple(t.shape) != expect:
                    hint = ""
                    if split_dim(key) is not None and t.shape[split_dim(key)] * n != full_shape(key, cfg)[split_dim(key)]:
                        hint = f"; shard count {n} does not match these sizes"
                    raise ConfigError(f"{path}: {key} has shape {tuple(t.shape)}, params.json "
                                      f"implies {expect}{hint}")
                if t.dtype != self.dtype:
                    raise ConfigError(f"{path}: {key} is {t.dtype}, other tensors {self.dtype}")

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (concatenated over shards when Meta splits it)."""
        dim = split_dim(name)
        if dim is None or self.num_shards == 1:
            return self.shards[0][name]
        return torch.cat([sd[name] for sd in self.shards], dim=dim)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i`` with layer-local names (``attention.wq.weight`` ...), full tensors."""
        return {suffix: self.tensor(f"layers.{i}.{suffix}") for suffix in META_LAYER_KEYS}


def prepare_output(output: str, force: bool) -> str:
    """Refuse an existing output unless ``force``; returns a fresh temporary sibling dir."""
    if os.path.exists(output) and not force:
        raise ConfigError(f"{output}: already exists (pass --force to replace it)")
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.tmp-")


def commit_output(tmp: str, output: str) -> None:
    """Move a complete temporary output into place (replacing an old one)."""
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)


def write_meta(output: str, cfg: LlamaConfig, get_tensor: Callable[[str], torch.Tensor],
               shards: int, dtype: Optional[torch.dtype] = None,
               tokenizer: Optional[str] = None, force: bool = False,
               progress: Optional[Callable[[Iterable], Iterable]] = None) -> str:
    """Write a Meta directory with ``shards`` files from full tensors given by name.

    Shard files are built one at a time (``get_tensor`` is called once per shard and key;
    make it cheap, e.g. memory-mapped). Returns ``output``.
    """
    if cfg.n_heads % shards or cfg.num_kv_heads % shards:
        raise ConfigError(f"cannot write {shards} shards: {cfg.n_heads} heads / "
                          f"{cfg.num_kv_heads} KV heads are not divisible")
    tmp = prepare_output(output, force)
    try:
        keys = meta_keys(cfg)
        for r in (progress or (lambda x: x))(range(shards)):
            shard = {}
            for key in keys:
                full = get_tensor(key)
                if dtype is not None:
                    full = full.to(dtype)
                dim = split_dim(key)
                part = full if dim is None else full.chunk(shards, dim=dim)[r]
                shard[key] = part.contiguous().clone()
            torch.save(shard, os.path.join(tmp, f"consolidated.{r:02d}.pth"))
            del shard
        cfg.to_params_json(os.path.join(tmp, "params.json"))
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        commit_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
