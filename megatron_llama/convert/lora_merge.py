"""A LoRA run's adapters merged into their base, as a checkpoint reader for every writer.

A LoRA fine-tuning run (`megatron-llama finetune --lora-rank R`) saves only its adapters;
its metadata names the base it started from and the LoRA settings. `LoraMergedSource`
presents base + adapters as one full model under Meta's names (one layer in memory at a
time: the base layer, its adapter slices, `model.lora.merge_layer`), so `write_meta`,
`write_hf` and `write_megatron` write a merged checkpoint in any format.
"""

from __future__ import annotations

import os
import torch

from megatron_llama.checkpoint_files import METADATA
from megatron_llama.convert.megatron_checkpoint import (
    LAYER_PREFIX,
    read_metadata,
    read_regions,
    stored_shapes,
)
from megatron_llama.convert.source import WeightSource, refuse_if_damaged
from megatron_llama.errors import ConfigError
from megatron_llama.model.canonical import META_LAYER_KEYS, layer_index, shape_mismatch
from megatron_llama.model.config import LlamaConfig
from megatron_llama.model.lora import ADAPTER_KEYS, merge_layer


def recorded_base(adapter_root: str) -> str:
    """The base checkpoint a LoRA run started from, as its metadata records it."""
    path, meta = read_metadata(adapter_root)
    if not meta.get("adapters_only"):
        raise ConfigError(f"{path}: not a LoRA adapter checkpoint (a full model: convert it "
                          "with `megatron-llama convert`)")
    if not meta.get("base"):
        raise ConfigError(f"{path}: the base checkpoint is not recorded; pass --base")
    return meta["base"]


class LoraMergedSource(WeightSource):
    """The latest adapter checkpoint under ``adapter_root`` merged into ``base`` (an open
    reader of the checkpoint the run started from, or of another copy of it)."""

    def __init__(self, adapter_root: str, base: WeightSource):
        from megatron_llama.compat.safe_loading import check_metadata, install

        install()
        self.base = base
        self.path, meta = read_metadata(adapter_root)
        check_metadata(self.path)
        refuse_if_damaged(self.path)
        lora = meta.get("lora") or {}
        try:
            self.scale = float(lora["alpha"]) / int(lora["rank"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise ConfigError(f"{os.path.join(self.path, METADATA)}: no valid lora settings "
                              "(rank, alpha)") from None
        trained = LlamaConfig.from_dict(meta["model"], source=os.path.join(self.path, METADATA))
        problems = shape_mismatch(base.config, trained)
        if problems:
            raise ConfigError(f"{base.description}: not the base of {self.path} "
                              f"({'; '.join(problems[:2])})")
        self.config, self.dtype = trained, self.base.dtype  # the run's (e.g. its context)
        self.tokenizer = self.base.tokenizer
        self.description = f"{self.base.description} + LoRA adapters (rank {lora['rank']})"
        self._shapes = stored_shapes(self.path)
        self._keys = [k for pair in ADAPTER_KEYS.values() for k in pair
                      if LAYER_PREFIX + k in self._shapes]
        if not self._keys:
            raise ConfigError(f"{self.path}: no adapter tensors stored")
        self._layer: tuple[int, dict[str, torch.Tensor]] = (-1, {})

    def tensor(self, name: str) -> torch.Tensor:
        i = layer_index(name)
        if i is None:
            return self.base.tensor(name)
        if self._layer[0] != i:
            self._layer = (-1, {})
            layer = {k: self.base.tensor(f"layers.{i}.{k}") for k in META_LAYER_KEYS}
            adapters = read_regions(self.path, self._shapes,
                                    {k: (LAYER_PREFIX + k, i) for k in self._keys})
            self._layer = (i, merge_layer(layer, adapters, self.config, self.scale))
        return self._layer[1][name.split(".", 2)[2]]

    def close(self) -> None:
        self.base.close()
