"""Fine-tuning recipes: the settings that differ from pretraining, by name.

``alpaca`` is Stanford Alpaca's (Taori et al. 2023, docs/finetuning.md): 3 epochs, peak lr
2e-5, linear warmup over 3 % of the steps, cosine decay to 0, batches of 128 sequences of
512 tokens, AdamW without weight decay (Hugging Face Trainer's betas 0.9/0.999), gradient
clipping 1.0.

``llama-i`` is the LLaMA paper's instruction-tuned model (section 4). The paper publishes
only the protocol (instruction data formatted as in Chung et al. 2022, a short fine-tuning of
the pretrained model), not the numbers, so this setting is this project's reading of it: keep
the pretraining optimizer (AdamW 0.9/0.95, weight decay 0.1, clip 1.0), pack instructions
into rows of the pretraining context (2048 tokens), one epoch at a peak lr of 1e-5 with 3 %
warmup and cosine decay to 10 %, 64 rows per step.

A recipe fills only what the command line leaves unset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_llama.errors import ConfigError

RECIPES: dict[str, dict] = {
    "alpaca": dict(lr=2e-5, epochs=3.0, warmup_ratio=0.03, global_batch=128, seq_length=512,
                   weight_decay=0.0, min_lr_ratio=0.0, adam_beta1=0.9, adam_beta2=0.999,
                   clip_grad=1.0),
    "llama-i": dict(lr=1e-5, epochs=1.0, warmup_ratio=0.03, global_batch=64, seq_length=2048,
                    weight_decay=0.1, min_lr_ratio=0.1, adam_beta1=0.9, adam_beta2=0.95,
                    clip_grad=1.0),
}

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass
class LoraSettings:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x on each target linear,
    B initialised to zero so the adapted model starts equal to the base."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--lora-targets: {' '.join(self.targets)} names a linear twice")
        if unknown or not self.targets:
            raise ConfigError(f"--lora-targets: unknown {unknown or 'empty set'}; choose from "
                              f"{', '.join(LORA_TARGETS)}")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSettings":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]))


@dataclass
class FinetuneOptions:
    """What a fine-tuning run adds to a `TrainConfig`."""

    init_from: str  # the checkpoint to start from (Meta, Hugging Face or megatron-llama)
    data_prefix: str  # `finetune-data` output
    recipe: str = "alpaca"
    epochs: float = 3.0
    warmup_ratio: float = 0.03
    valid_fraction: float = 0.02
    packed: bool = True
    lora: Optional[LoraSettings] = None
    extra: dict = field(default_factory=dict)


def recipe_defaults(name: str) -> dict:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def steps_for(rows: int, global_batch: int, epochs: float) -> int:
    """Optimizer steps that cover ``epochs`` passes over ``rows`` rows (at least one)."""
    if epochs <= 0:
        raise ConfigError(f"--epochs must be > 0, got {epochs}")
    return max(1, math.ceil(epochs * rows / global_batch))


def warmup_for(train_steps: int, ratio: float) -> int:
    """Warmup steps: ``ratio`` of the run, rounded up (Hugging Face's warmup_ratio)."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {ratio}")
    return math.ceil(ratio * train_steps)
