"""LLaMA model configuration with Meta's field names, the paper's presets, and exact counts.

`LlamaConfig` mirrors Meta's ``params.json`` (LLaMA-1, plus Llama-2's ``n_kv_heads`` and
``ffn_dim_multiplier``). `PRESETS` holds the paper's Table 2 models with their training
defaults. `to_transformer_config` is the one place where a `LlamaConfig` becomes a
megatron-core `TransformerConfig`.

Nothing here allocates weights: parameter counts are computed from the shapes, so the 65B
preset can be inspected on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from megatron_llama.errors import ConfigError, read_json_object
from megatron_llama.fileio import atomic_write


class Layout(Protocol):
    """What the model mapping needs to know of a parallel layout (`parallel.ParallelLayout`
    is the implementation; the model stage does not import the parallel stage)."""

    tp: int
    pp: int
    vp: Optional[int]
    sp: bool


# Megatron pads the vocabulary to a multiple of (divisible_by * TP). 32 keeps LLaMA's 32000
# unpadded for every TP up to 8 (32000 = 125 * 256), so padded rows never enter the softmax.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 32


@dataclass
class LlamaConfig:
    """Model hyper-parameters, named exactly like Meta's ``params.json``.

    ``n_kv_heads=None`` means multi-head attention (LLaMA-1); Llama-2 70B sets it to 8 (GQA).
    ``max_seq_len`` and ``rope_theta`` are not in LLaMA-1's params.json; defaults are the paper's.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_kv_heads is not None and (not isinstance(self.n_kv_heads, int)
                                            or self.n_kv_heads <= 0):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads!r} must be a positive integer")
        if not isinstance(self.vocab_size, int):
            raise ConfigError(f"vocab_size={self.vocab_size!r} must be an integer")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.num_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.num_kv_heads}"
            )
        if self.vocab_size <= 0:
            raise ConfigError(f"vocab_size={self.vocab_size} must be positive (params.json "
                              "stores -1: pass the tokenizer's size)")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width as Meta derives it: 2/3 of 4*dim, optional multiplier, round up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary rows megatron-core allocates: a multiple of 32 * TP."""
        multiple = MAKE_VOCAB_SIZE_DIVISIBLE_BY * tp
        return multiple * math.ceil(self.vocab_size / multiple)

    # ---- exact counts (no allocation) ----------------------------------------------------
    def layer_params(self) -> int:
        """Parameters of one transformer block: attention, SwiGLU MLP and two RMSNorms."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.num_kv_heads * hd + self.n_heads * hd * d
        mlp = 3 * d * self.ffn_hidden_size
        return attn + mlp + 2 * d

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count with the unpadded vocabulary (the paper's numbers).

        ``include_embedding=False`` drops the input embedding only (the N in PaLM's MFU);
        the untied output layer is a matmul and stays counted.
        """
        embedding = self.vocab_size * self.dim
        output = self.vocab_size * self.dim
        total = self.n_layers * self.layer_params() + self.dim + output
        return total + (embedding if include_embedding else 0)

    # ---- params.json ---------------------------------------------------------------------
    @classmethod
    def from_params_json(cls, path: str, vocab_size: Optional[int] = None) -> "LlamaConfig":
        """Read Meta's params.json. ``vocab_size: -1`` there is replaced by ``vocab_size``."""
        return cls.from_dict(read_json_object(path), vocab_size=vocab_size, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], vocab_size: Optional[int] = None,
                  source: str = "params") -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        values = {k: v for k, v in raw.items() if k in names}
        if values.get("vocab_size", -1) in (-1, None):
            if vocab_size is None:
                raise ConfigError(f"{source}: vocab_size is -1; the tokenizer's size is needed")
            values["vocab_size"] = vocab_size
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:  # a value the model cannot have: say which file holds it
            raise ConfigError(f"{source}: {e}") from None

    def to_params_json(self, path: Optional[str] = None, meta_style: bool = True) -> dict:
        """Meta's params.json fields; Llama-2 fields only when set. Writes atomically if a path is given."""
        out: dict[str, Any] = {
            "dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads,
            "n_layers": self.n_layers, "norm_eps": self.norm_eps,
            "vocab_size": -1 if meta_style and self.vocab_size == 32000 else self.vocab_size,
        }
        if self.n_kv_heads is not None:
            out["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            out["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.max_seq_len != 2048:
            out["max_seq_len"] = self.max_seq_len
        if self.rope_theta != 10000.0:
            out["rope_theta"] = self.rope_theta
        if path is not None:
            atomic_write(path, lambda f: json.dump(out, f))
        return out

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    """A named model with the paper's training defaults (Table 2) and Meta's shard count."""

    name: str
    model: LlamaConfig
    lr: float
    train_tokens: int
    batch_tokens: int = 4 * 1024 * 1024  # 4M tokens = 2048 sequences of 2048
    meta_shards: int = 1
    paper_gpu_hours: Optional[int] = None  # Table 15
    notes: str = field(default="", compare=False)


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
    ]
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name (case-insensitive: '7b' works)."""
    for key, preset in PRESETS.items():
        if key.lower() == name.lower():
            return preset
    raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


def to_transformer_config(
    cfg: LlamaConfig,
    layout: Layout,
    *,
    dtype: str = "fp32",
    recompute: str = "none",
    on_gpu: Optional[bool] = None,
    **overrides: Any,
):
    """Map a `LlamaConfig` and a parallel layout onto megatron-core's `TransformerConfig`.

    LLaMA: RMSNorm (eps = norm_eps) pre-norm, gated SiLU MLP (SwiGLU), no biases, no dropout,
    rotary embeddings (set on the GPTModel), untied output layer. ``dtype`` is fp32, bf16 or
    fp16 (params and compute; fp32 main weights live in the optimizer). ``recompute`` is
    none, selective (core attention) or full (every layer, uniform). Fused GPU kernels are
    switched on only where CUDA exists (``on_gpu=None`` detects it).
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ConfigError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    if recompute not in ("none", "selective", "full"):
        raise ConfigError(f"recompute must be none, selective or full, got {recompute!r}")
    recompute_kw: dict[str, Any] = {}
    if recompute == "full":
        recompute_kw = dict(recompute_granularity="full", recompute_method="uniform",
                            recompute_num_layers=1)
    elif recompute == "selective":
        # "core_attn" only: megatron-core 0.16.1's selective "layernorm" recompute needs TE.
        recompute_kw = dict(recompute_granularity="selective", recompute_modules=["core_attn"])

    kwargs: dict[str, Any] = dict(
        num_layers=cfg.n_layers,
        hidden_size=cfg.dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        sequence_parallel=layout.sp,
        params_dtype=dtypes[dtype],
        pipeline_dtype=dtypes[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        # gloo is silently wrong with batched p2p for interleaved schedules (docs/megatron-core.md);
        # NCCL handles both, so only CPU runs turn it off.
        batch_p2p_comm=on_gpu,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # On CPU, full weights are drawn from the seeded CPU generator and then sliced, so
        # the initial model is the same for every TP/DP layout. GPUs initialise in place.
        use_cpu_initialization=not on_gpu,
        **recompute_kw,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
