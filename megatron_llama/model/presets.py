"""Named models: the LLaMA paper's Table 2 and Meta's later releases, with training defaults.

Each preset is the architecture of a released model (its params.json plus the context it was
published with) and the pretraining defaults its paper gives. Parameter counts are exact and
computed from the shapes (`LlamaConfig.num_params`); tests assert them against the published
numbers (docs/llama-family.md). Names: the LLaMA-1 sizes keep their paper names (``7B`` ..
``65B``); later generations are ``llama2-7b``, ``codellama-7b``, ``llama3.1-405b`` and so on.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Optional

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig


@dataclass(frozen=True)
class Preset:
    """A named model with its paper's training defaults and Meta's shard count.

    ``tokenizer`` is the tokenizer family of the release: ``sentencepiece`` (LLaMA-1, Llama 2,
    Code Llama; bos 1, eos 2) or ``tiktoken`` (Llama 3.x; bos 128000, eos 128001).
    """

    name: str
    model: LlamaConfig
    lr: float
    train_tokens: int
    batch_tokens: int = 4 * 1024 * 1024  # 4M tokens = 2048 sequences of 2048
    meta_shards: int = 1
    paper_gpu_hours: Optional[int] = None  # LLaMA Table 15, Llama 2 Table 2
    generation: str = "llama1"
    tokenizer: str = "sentencepiece"
    notes: str = field(default="", compare=False)
    # Sequence length of pretraining when it differs from the model's context: Llama 3.1
    # pretrains at 8192 and extends to 131072 only at the end (Llama 3 paper, 3.4.2).
    pretrain_seq_length: Optional[int] = None

    @property
    def seq_length(self) -> int:
        """The default sequence length of `pretrain`, `plan` and `sbatch` for this preset."""
        return self.pretrain_seq_length or self.model.max_seq_len


def _llama2(dim, layers, heads, kv=None, mult=None, multiple_of=256, **kw) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                       ffn_dim_multiplier=mult, multiple_of=multiple_of, norm_eps=1e-5,
                       max_seq_len=4096, **kw)


def _llama3(dim, layers, heads, mult, multiple_of, scaled: bool) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=8,
                       ffn_dim_multiplier=mult, multiple_of=multiple_of, norm_eps=1e-5,
                       vocab_size=128256, rope_theta=500000.0, use_scaled_rope=scaled,
                       max_seq_len=131072 if scaled else 8192)


_L2 = dict(train_tokens=2 * 10**12, generation="llama2")
# Llama 3 publishes the 405B recipe only (peak 8e-5, batch growing to 16M tokens); the 8B and
# 70B rates here are Llama 2's, stated as such in `notes`.
_L3 = dict(train_tokens=15 * 10**12, generation="llama3", tokenizer="tiktoken")
_L31 = dict(_L3, generation="llama3.1", pretrain_seq_length=8192)
_L3_LR_NOTE = "lr not published for this size: Llama 2's"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny", LlamaConfig(dim=256, n_layers=4, n_heads=4, vocab_size=8192,
                                   multiple_of=32, max_seq_len=256),
               lr=1e-3, train_tokens=20_000_000, batch_tokens=16 * 256,
               notes="CPU quickstart and tests"),
        Preset("7B", LlamaConfig(dim=4096, n_layers=32, n_heads=32),
               lr=3.0e-4, train_tokens=10**12, meta_shards=1, paper_gpu_hours=82_432),
        Preset("13B", LlamaConfig(dim=5120, n_layers=40, n_heads=40),
               lr=3.0e-4, train_tokens=10**12, meta_shards=2, paper_gpu_hours=135_168),
        Preset("33B", LlamaConfig(dim=6656, n_layers=60, n_heads=52),
               lr=1.5e-4, train_tokens=14 * 10**11, meta_shards=4, paper_gpu_hours=530_432),
        Preset("65B", LlamaConfig(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5),
               lr=1.5e-4, train_tokens=14 * 10**11, meta_shards=8, paper_gpu_hours=1_022_362),
        Preset("llama2-7b", _llama2(4096, 32, 32), lr=3.0e-4, meta_shards=1,
               paper_gpu_hours=184_320, **_L2),
        Preset("llama2-13b", _llama2(5120, 40, 40), lr=3.0e-4, meta_shards=2,
               paper_gpu_hours=368_640, **_L2),
        Preset("llama2-70b", _llama2(8192, 80, 64, kv=8, mult=1.3, multiple_of=4096),
               lr=1.5e-4, meta_shards=8, paper_gpu_hours=1_720_320, **_L2),
        Preset("codellama-7b", LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32016,
                                           ffn_dim_multiplier=1.0, norm_eps=1e-5,
                                           rope_theta=1_000_000.0, max_seq_len=16384),
               lr=3.0e-4, train_tokens=500 * 10**9, meta_shards=1, generation="codellama",
               notes="Llama 2 7B trained on 500B code tokens, then 16k-context fine-tuning"),
        Preset("llama3-8b", _llama3(4096, 32, 32, 1.3, 1024, False), lr=3.0e-4,
               meta_shards=1, notes=_L3_LR_NOTE, **_L3),
        Preset("llama3-70b", _llama3(8192, 80, 64, 1.3, 4096, False), lr=1.5e-4,
               meta_shards=8, notes=_L3_LR_NOTE, **_L3),
        Preset("llama3.1-8b", _llama3(4096, 32, 32, 1.3, 1024, True), lr=3.0e-4,
               meta_shards=1, notes=_L3_LR_NOTE, **_L31),
        Preset("llama3.1-70b", _llama3(8192, 80, 64, 1.3, 4096, True), lr=1.5e-4,
               meta_shards=8, notes=_L3_LR_NOTE, **_L31),
        Preset("llama3.1-405b", _llama3(16384, 126, 128, 1.2, 4096, True), lr=8e-5,
               meta_shards=8, batch_tokens=16 * 1024 * 1024,
               notes="Llama 3 paper: peak 8e-5, batch 4M -> 8M -> 16M tokens", **_L31),
    ]
}

# Sizes people call the LLaMA-1 models by in other tools.
ALIASES = {"llama-7b": "7B", "llama-13b": "13B", "llama-33b": "33B", "llama-65b": "65B",
           "llama1-7b": "7B", "llama1-13b": "13B", "llama1-33b": "33B", "llama1-65b": "65B"}


def get_preset(name: str) -> Preset:
    """Look a preset up by name (case-insensitive: '7b' and 'Llama3.1-8B' work)."""
    key = ALIASES.get(name.lower(), name)
    for preset_name, preset in PRESETS.items():
        if preset_name.lower() == key.lower():
            return preset
    sized = [p for p in PRESETS if p.lower().endswith("-" + name.lower())]
    hint = f" (did you mean {' or '.join(sized)}?)" if sized else ""
    raise ConfigError(f"unknown preset {name!r}{hint}; choose from {', '.join(PRESETS)}")


def preset_of(cfg: LlamaConfig) -> Optional[Preset]:
    """The released model whose architecture ``cfg`` has (not ``tiny``), or None.

    Llama 3 8B and 3.1 8B differ only in ``use_scaled_rope``, so every match is unique.
    """
    for preset in PRESETS.values():
        if preset.name != "tiny" and preset.model.architecture() == cfg.architecture():
            return preset
    return None


def with_released_ffn_rule(cfg: LlamaConfig) -> LlamaConfig:
    """``cfg`` with the released model's ``multiple_of`` / ``ffn_dim_multiplier`` when a
    release has its shape and FFN width (a Hugging Face config.json gives only the width,
    and Meta's params.json needs the rule); else ``cfg`` unchanged."""
    for preset in PRESETS.values():
        m = preset.model
        if preset.name != "tiny" and dataclasses.replace(
                m, multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier,
                max_seq_len=cfg.max_seq_len) == cfg and m.ffn_hidden_size == cfg.ffn_hidden_size:
            return dataclasses.replace(cfg, multiple_of=m.multiple_of,
                                       ffn_dim_multiplier=m.ffn_dim_multiplier)
    return cfg


def published_context(cfg: LlamaConfig) -> Optional[int]:
    """The context length the release with this architecture was published with."""
    preset = preset_of(cfg)
    return preset.model.max_seq_len if preset else None
