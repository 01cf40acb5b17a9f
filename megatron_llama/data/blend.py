"""Data blends: a YAML file of weighted sources, read through megatron-core's dataset builder.

```yaml
split: "969,30,1"            # train, valid, test shares of every source
sources:
  - name: commoncrawl
    prefix: cc/text          # <prefix>.bin / .idx from `megatron-llama preprocess`,
    weight: 67.0             #   relative to this file; weights are normalised
    epochs: 1.10             # optional, documentation (the paper's Table 1)
```

`pretrain --data` also takes Megatron-LM's forms (`resolve_data`): one dataset prefix
(``--data data/code``, weight 1), or weight / prefix pairs (``--data 0.3 data/code 0.7
data/prose``). `preprocess --blend FILE` adds its output to a blend YAML (`add_to_blend`).

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
        """Every source exists, its .idx and .bin agree (`indexed.check_pair`), and it has
        documents in each split of non-zero share.

        megatron-core 0.16.1 loops forever on a split without documents; we refuse instead.
        """
        from megatron_llama.data.indexed import check_pair

        bounds = [0.0]
        for f in self.split_fractions:
            bounds.append(bounds[-1] + f)
        for s in self.sources:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(s.prefix + ext):
                    raise ConfigError(f"{self.path}: source {s.name!r}: {s.prefix + ext} not found "
                                      "(run `megatron-llama preprocess` first)")
            try:
                n = check_pair(s.prefix)  # sizes, dtype and counts agree
            except ValueError as e:
                raise ConfigError(f"{self.path}: source {s.name!r}: {e}") from None
            for name, beg, end in zip(("train", "valid", "test"), bounds[:-1], bounds[1:]):
                if end > beg and round(end * n) - round(beg * n) < 1:
                    raise ConfigError(f"{self.path}: source {s.name!r} has {n} documents, none "
                                      f"in its {name} split (split {self.split}); add data or "
                                      "change the split")


DATA_FORMS = ("a blend YAML, a dataset prefix (PREFIX.bin/.idx from `megatron-llama "
              "preprocess`) or weight/prefix pairs like 0.3 A 0.7 B")


def _dataset_prefix(value: str) -> Optional[str]:
    """``value`` as the prefix of an existing indexed dataset, or None."""
    prefix = value[:-4] if value.endswith((".bin", ".idx")) else value
    if value.endswith((".yaml", ".yml")):
        return None
    if os.path.isfile(prefix + ".bin") or os.path.isfile(prefix + ".idx"):
        return prefix
    return None


def resolve_data(spec) -> DataBlend:
    """The blend `pretrain --data` names: a YAML file, one prefix, or weight/prefix pairs."""
    values = [spec] if isinstance(spec, str) else [str(v) for v in spec]
    if not values:
        raise ConfigError(f"--data is empty: pass {DATA_FORMS}")
    if len(values) == 1:
        value = values[0]
        prefix = _dataset_prefix(value)  # (PREFIX/ may also exist: megatron-core's cache)
        if prefix is None and os.path.isdir(value):
            raise ConfigError(f"{value}: is a directory; --data takes {DATA_FORMS}")
        if prefix is None:
            return load_blend(value)
        return DataBlend((Source(os.path.basename(prefix), os.path.abspath(prefix), 1.0),),
                         path=prefix)
    if len(values) % 2:
        raise ConfigError(f"--data {' '.join(values)}: several values must be weight/prefix "
                          "pairs, e.g. --data 0.3 data/code 0.7 data/prose")
    sources = []
    for weight, value in zip(values[::2], values[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"--data: {weight!r} is not a weight (pairs: WEIGHT PREFIX ...)"
                              ) from None
        if w <= 0:
            raise ConfigError(f"--data: weight {weight} of {value} must be > 0")
        prefix = _dataset_prefix(value)
        if prefix is None:
            raise ConfigError(f"{value}: no {value}.bin/.idx (run `megatron-llama preprocess` "
                              "first)")
        sources.append(Source(os.path.basename(prefix), os.path.abspath(prefix), w))
    return DataBlend(tuple(sources), path="--data")


def add_to_blend(blend_path: str, prefix: str, weight: float = 1.0,
                 name: Optional[str] = None) -> str:
    """Add (or update) the source ``prefix`` in the blend YAML ``blend_path``, creating the
    file if needed; prefixes are stored relative to the file. Returns ``blend_path``."""
    import yaml

    from megatron_llama.fileio import write_text

    raw: dict = {"split": "969,30,1", "sources": []}
    if os.path.exists(blend_path):
        load_blend(blend_path)  # refuse to edit a broken file
        with open(blend_path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(blend_path))
    relative = os.path.relpath(os.path.abspath(prefix), base)
    name = name or os.path.basename(prefix)
    entry = {"name": name, "prefix": relative, "weight": float(weight)}
    kept = [s for s in raw["sources"]
            if os.path.abspath(os.path.join(base, str(s["prefix"]))) != os.path.abspath(prefix)]
    raw["sources"] = kept + [entry]
    write_text(blend_path, yaml.safe_dump(raw, sort_keys=False))
    return blend_path


def load_blend(path: str) -> DataBlend:
    """Read and validate a blend YAML; prefixes become absolute (relative to the file)."""
    import yaml

    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, not a blend YAML")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: blend file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as a blend YAML ({e})") from None
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
    # megatron-core logs every split and cache file it builds at INFO, per rank: keep warnings
    import logging

    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)

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
