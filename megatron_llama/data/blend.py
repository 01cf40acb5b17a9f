"""Data blends: a YAML file of weighted sources, read through megatron-core's dataset builder.

```yaml
split: "969,30,1"            # train, valid, test shares of every source
sources:
  - name: commoncrawl
    prefix: cc/text          # <prefix>.bin / .idx from `megatron-llama preprocess`,
    weight: 67.0             #   relative to this file; weights are normalised
    epochs: 1.10             # optional, documentation (the paper's Table 1)
```

`build_gpt_datasets` hands the blend to megatron-core's ``BlendedMegatronDatasetBuilder``
with ``GPTDataset``: each source is split train/valid/test, sequences are sampled across
documents (EOS separates them), and ``BlendedDataset`` interleaves sources by weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_llama.errors import ConfigError


@dataclass(frozen=True)
class Source:
    name: str
    prefix: str  # absolute path prefix of .bin/.idx
    weight: float
    epochs: Optional[float] = None


@dataclass(frozen=True)
class DataBlend:
    sources: tuple[Source, ...]
    split: str = "969,30,1"
    path: str = "<blend>"

    @property
    def weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    @property
    def split_fractions(self) -> list[float]:
        parts = [float(p) for p in self.split.split(",")]
        return [p / sum(parts) for p in parts]

    def check_files(self) -> None:
        """Every source exists and has documents in each split of non-zero share.

        megatron-core 0.16.1 loops forever on a split without documents; we refuse instead.
        """
        from megatron_llama.data.indexed import document_count

        bounds = [0.0]
        for f in self.split_fractions:
            bounds.append(bounds[-1] + f)
        for s in self.sources:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(s.prefix + ext):
                    raise ConfigError(f"{self.path}: source {s.name!r}: {s.prefix + ext} not found "
                                      "(run `megatron-llama preprocess` first)")
            try:
                n = document_count(s.prefix)
            except ValueError as e:
                raise ConfigError(f"{self.path}: source {s.name!r}: {e}") from None
            for name, beg, end in zip(("train", "valid", "test"), bounds[:-1], bounds[1:]):
                if end > beg and round(end * n) - round(beg * n) < 1:
                    raise ConfigError(f"{self.path}: source {s.name!r} has {n} documents, none "
                                      f"in its {name} split (split {self.split}); add data or "
                                      "change the split")


def load_blend(path: str) -> DataBlend:
    """Read and validate a blend YAML; prefixes become absolute (relative to the file)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: blend file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'sources' list")
    base = os.path.dirname(os.path.abspath(path))
    sources = []
    for i, item in enumerate(raw["sources"]):
        if not isinstance(item, dict) or "prefix" not in item or "weight" not in item:
            raise ConfigError(f"{path}: source #{i + 1} needs 'prefix' and 'weight'")
        try:
            weight = float(item["weight"])
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: source #{i + 1} has a non-numeric weight") from None
        if weight <= 0:
            raise ConfigError(f"{path}: source #{i + 1} has weight {weight}; weights must be > 0")
        prefix = os.path.join(base, os.path.expanduser(str(item["prefix"])))
        epochs = item.get("epochs")
        sources.append(Source(str(item.get("name", f"source{i + 1}")), prefix, weight,
                              float(epochs) if epochs is not None else None))
    split = str(raw.get("split", "969,30,1"))
    parts = split.split(",")
    if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
        raise ConfigError(f"{path}: split must be three numbers like '969,30,1', got {split!r}")
    return DataBlend(tuple(sources), split, path)


@dataclass
class DatasetTokenizer:
    """What megatron-core's GPTDataset reads of a tokenizer: vocab size and the EOD id (our EOS).

    No ``pad`` attribute: GPTDataset then uses its own pad id, outside the vocabulary.
    """

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:
        """Part of the dataset cache key megatron-core hashes."""
        return {"class": "megatron_llama.DatasetTokenizer", "vocab_size": self.vocab_size,
                "eod": self.eod}


def build_gpt_datasets(blend: DataBlend, *, vocab_size: int, eod: int, seq_length: int,
                       samples: tuple[int, int, int], seed: int = 1234,
                       cache_dir: Optional[str] = None):
    """(train, valid, test) megatron-core datasets of ``samples`` sequences each."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend.check_files()

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([s.prefix for s in blend.sources], blend.weights),
        split=blend.split,
        path_to_cache=cache_dir,
        tokenizer=DatasetTokenizer(vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no mask tensor
        mmap_bin_files=True,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, list(samples), lambda: True, config).build()
