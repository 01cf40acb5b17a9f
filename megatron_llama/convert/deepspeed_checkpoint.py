"""DeepSpeed ZeRO checkpoints written by `pretrain --engine deepspeed`, read as Meta tensors.

A DeepSpeed checkpoint root holds ``latest`` (the tag, e.g. ``iter_0000100``) and per tag:
``megatron_llama.json`` (our model config), per tensor-parallel rank r the model states
(``mp_rank_RR_model_states.pt``; under ZeRO-3 ``zero_pp_rank_D_mp_rank_RR_model_states.pt``)
with ``param_shapes`` (the parameters of each optimizer group, in order), and one optimizer
file per data-parallel rank D (``zero_pp_rank_D_mp_rank_RR_optim_states.pt``) holding that
rank's slice of the fp32 master weights.

The weights are consolidated the way DeepSpeed's ``zero_to_fp32`` does it: under ZeRO-1/2
each group's flat fp32 vector is the DP ranks' partitions end to end, parameters laid out in
``param_shapes`` order (plus recorded alignment padding); under ZeRO-3 every parameter is
split over the DP ranks, each holding ``ceil(numel / dp)`` elements at the same offset of its
flat groups. Differences from ``zero_to_fp32``: files are memory-mapped and loaded with
``weights_only=True`` (three DeepSpeed data classes allowlisted, nothing else), only the
requested parameter's bytes are read, one layer at a time, and tensor-parallel ranks are
merged (megatron-core's names, through `canonical.layer_to_meta`).
"""

from __future__ import annotations

import math
import os

import torch

from megatron_llama.checkpoint_files import DEEPSPEED_OPTIM_RE as OPTIM_RE
from megatron_llama.checkpoint_files import METADATA, deepspeed_latest_tag
from megatron_llama.convert.source import WeightSource, refuse_if_damaged
from megatron_llama.convert.tensorio import release_pages
from megatron_llama.errors import ConfigError, read_json_object
from megatron_llama.model.canonical import (
    LAYER_NORM_NAMES,
    layer_index,
    layer_to_meta,
    vocab_to_meta,
)
from megatron_llama.model.config import LlamaConfig

TOP = {"tok_embeddings.weight": "embedding.word_embeddings.weight",
       "norm.weight": "decoder.final_layernorm.weight", "output.weight": "output_layer.weight"}


def _load(path: str) -> dict:
    from megatron_llama.compat.safe_loading import deepspeed_safe_globals
    from megatron_llama.convert.meta import load_tensor_file

    return load_tensor_file(path, allowed=tuple(deepspeed_safe_globals()),
                            what="DeepSpeed checkpoint file")


class _RankWeights:
    """The fp32 master weights of one tensor-parallel rank, gathered from its DP partitions."""

    def __init__(self, folder: str, tp_rank: int):
        optim = sorted((int(m.group(1)), f) for f in os.listdir(folder)
                       if (m := OPTIM_RE.match(f)) and int(m.group(2)) == tp_rank)
        if not optim:
            raise ConfigError(f"{folder}: no optimizer files of tensor-parallel rank {tp_rank}")
        states = [_load(os.path.join(folder, f))["optimizer_state_dict"] for _, f in optim]
        first = states[0]
        self.stage = int(first["zero_stage"])
        count = first["partition_count"]
        count = max(count) if isinstance(count, (list, tuple)) else count
        if count != len(optim) or [d for d, _ in optim] != list(range(len(optim))):
            raise ConfigError(f"{folder}: {len(optim)} optimizer files for TP rank {tp_rank}, "
                              f"the checkpoint was saved by {count} data-parallel ranks")
        model_file = (f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt" if self.stage == 3
                      else f"mp_rank_{tp_rank:02d}_model_states.pt")
        if not os.path.isfile(os.path.join(folder, model_file)):
            raise ConfigError(f"{folder}: missing {model_file}")
        shapes = _load(os.path.join(folder, model_file))["param_shapes"]
        key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        self.flat = [s[key] for s in states]  # [dp rank][group] -> 1-D fp32
        self.where: dict[str, tuple] = {}
        if self.stage == 3:
            self._locate_zero3(shapes)
        else:
            self._locate_zero12(shapes, first.get("param_alignment_paddings"))

    def _locate_zero12(self, shapes, paddings) -> None:
        for g, group in enumerate(shapes):
            offset = 0
            for j, (name, shape) in enumerate(group.items()):
                numel = math.prod(shape)
                self.where[name] = (g, offset, numel, tuple(shape))
                offset += numel + (paddings[g][j] if paddings is not None else 0)
            available = sum(part[g].numel() for part in self.flat)
            if offset > available:
                raise ConfigError(f"optimizer group {g} holds {available} values, its "
                                  f"parameters need {offset} (incomplete checkpoint?)")

    def _locate_zero3(self, shapes) -> None:
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                numel = math.prod(shape)
                per_rank = math.ceil(numel / len(self.flat))
                self.where[name] = (None, offset, numel, tuple(shape))
                offset += per_rank

    def _pieces(self, vectors: list[torch.Tensor], start: int, length: int) -> list:
        """Slices covering [start, start + length) of the concatenation of ``vectors``."""
        out, base = [], 0
        for v in vectors:
            lo, hi = max(start, base), min(start + length, base + v.numel())
            if lo < hi:
                out.append((v, v.narrow(0, lo - base, hi - lo)))
            base += v.numel()
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (megatron-core's name on this TP rank), fp32, fresh memory."""
        if name not in self.where:
            raise ConfigError(f"DeepSpeed checkpoint has no parameter {name}")
        g, offset, numel, shape = self.where[name]
        if g is not None:  # ZeRO-1/2: the group's partitions end to end
            pieces = self._pieces([part[g] for part in self.flat], offset, numel)
        else:  # ZeRO-3: each DP rank's share of this parameter, at the same offset
            per_rank = math.ceil(numel / len(self.flat))
            pieces = [p for part in self.flat for p in self._pieces(part, offset, per_rank)]
        out = torch.cat([view for _, view in pieces])[:numel].view(shape)
        for whole, _ in pieces:
            release_pages(whole)
        return out


class DeepSpeedCheckpoint(WeightSource):
    """The latest checkpoint under a DeepSpeed root, consolidated one layer at a time."""

    def __init__(self, root: str):
        tag = deepspeed_latest_tag(root)
        if tag is None:
            raise ConfigError(f"{root}: no DeepSpeed 'latest' file (not a DeepSpeed checkpoint)")
        folder = os.path.join(root, tag)
        meta_path = os.path.join(folder, METADATA)
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{folder}: missing {METADATA} (model config); was it saved by "
                              "`megatron-llama pretrain --engine deepspeed`?")
        meta = read_json_object(meta_path)
        refuse_if_damaged(folder)
        if not isinstance(meta.get("model"), dict):
            raise ConfigError(f"{meta_path}: no model config")
        self.config = LlamaConfig.from_dict(meta["model"], source=meta_path)
        self.tp = int(meta.get("layout", {}).get("tp", 1))
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[meta.get("dtype", "fp32")]
        tok = meta.get("tokenizer")
        self.tokenizer = tok if tok and os.path.isfile(tok) else None
        self.ranks = [_RankWeights(folder, r) for r in range(self.tp)]
        self.description = (f"DeepSpeed ZeRO-{self.ranks[0].stage}, {tag}, TP={self.tp}, "
                            f"DP={len(self.ranks[0].flat)}")
        te = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in self.ranks[0].where
        self.names = "te" if te else "local"
        self._layer: tuple[int, dict] = (-1, {})

    def tensor(self, name: str) -> torch.Tensor:
        i = layer_index(name)
        if i is None:
            parts = [r.tensor(TOP[name]) for r in self.ranks]
            return parts[0] if name == "norm.weight" else vocab_to_meta(parts, self.config)
        if self._layer[0] != i:
            self._layer = (-1, {})
            prefix = f"decoder.layers.{i}."
            suffixes = ["self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                        "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
                        *LAYER_NORM_NAMES[self.names].values()]
            per_tp = [{s: r.tensor(prefix + s) for s in suffixes} for r in self.ranks]
            self._layer = (i, layer_to_meta(per_tp, self.config, self.names))
        return self._layer[1][name.split(".", 2)[2]]
