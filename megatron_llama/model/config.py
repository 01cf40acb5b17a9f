"""LLaMA model configuration with Meta's field names, exact counts, the megatron-core mapping.

`LlamaConfig` mirrors Meta's ``params.json`` of every generation (LLaMA-1; Llama 2's
``n_kv_heads`` and ``ffn_dim_multiplier``; Code Llama's ``rope_theta``; Llama 3.1's
``use_scaled_rope``). The named models live in `presets`. `to_transformer_config` is the one
place where a `LlamaConfig` becomes a megatron-core `TransformerConfig`.

Nothing here allocates weights: parameter counts are computed from the shapes, so the 405B
preset can be inspected on a laptop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
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
    cp: int
    first_stage_layers: Optional[int]
    last_stage_layers: Optional[int]
    embedding_and_loss_as_layers: bool


# Megatron pads the vocabulary to a multiple of (divisible_by * TP). 32 keeps LLaMA's 32000
# unpadded for every TP up to 8 (32000 = 125 * 256), so padded rows never enter the softmax.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 32


# Llama 3.1's RoPE scaling constants besides the factor: Meta's code fixes them, and so does
# megatron-core's RotaryEmbedding (docs/llama-family.md, "RoPE scaling").
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass
class LlamaConfig:
    """Model hyper-parameters, named exactly like Meta's ``params.json`` (every generation).

    ``n_kv_heads=None`` means multi-head attention (LLaMA-1, Llama 2 7B/13B); Llama 2 70B and
    Llama 3 set it to 8 (GQA). ``ffn_dim_multiplier`` and ``multiple_of`` fix the SwiGLU
    width (`ffn_hidden_size`). ``use_scaled_rope`` is Llama 3.1's RoPE scaling, with
    ``rope_scaling_factor`` (8 in every 3.1 release). ``max_seq_len`` is not in Meta's files:
    their reader takes the published context of the release with this architecture
    (`presets.published_context`), else 2048.
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
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_kv_heads is not None and not _positive_int(self.n_kv_heads):
            raise ConfigError(f"n_kv_heads={self.n_kv_heads!r} must be a positive integer")
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            raise ConfigError(f"vocab_size={self.vocab_size!r} must be an integer")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor"):
            if not _positive_number(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive number")
        if self.ffn_dim_multiplier is not None and not _positive_number(self.ffn_dim_multiplier):
            raise ConfigError(f"ffn_dim_multiplier={self.ffn_dim_multiplier!r} must be a "
                              "positive number")
        if not isinstance(self.use_scaled_rope, bool):
            raise ConfigError(f"use_scaled_rope={self.use_scaled_rope!r} must be true or false")
        if self.rope_scaling_factor < 1:
            raise ConfigError(f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1")
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

    def architecture(self) -> tuple:
        """Everything that fixes the weights and the function they compute, but not the
        context length (what `presets.published_context` matches on)."""
        return (self.dim, self.n_layers, self.n_heads, self.num_kv_heads, self.vocab_size,
                self.ffn_hidden_size, self.norm_eps, float(self.rope_theta),
                self.use_scaled_rope, self.rope_scaling_factor if self.use_scaled_rope else None)

    # ---- exact counts (no allocation) ----------------------------------------------------
    def layer_params(self) -> int:
        """Parameters of one transformer block: attention, SwiGLU MLP and two RMSNorms."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.num_kv_heads * hd + self.n_heads * hd * d
        mlp = 3 * d * self.ffn_hidden_size
        return attn + mlp + 2 * d

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count with the unpadded vocabulary (the papers' numbers).

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
        """A config from params.json fields; one line naming ``source`` and the field if a
        field is missing, unknown or has a value the model cannot have."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r} (a newer model "
                              f"generation?); known fields: {', '.join(names)}")
        values = dict(raw)
        if values.get("vocab_size", -1) in (-1, None):
            if vocab_size is None:
                raise ConfigError(f"{source}: vocab_size is -1; the tokenizer's size is needed")
            values["vocab_size"] = vocab_size
        try:
            return cls(**values)
        except ConfigError as e:  # a value the model cannot have: say which file holds it
            raise ConfigError(f"{source}: {e}") from None

    def to_params_json(self, path: Optional[str] = None, meta_style: bool = True,
                       context_default: int = 2048) -> dict:
        """params.json fields; writes atomically if a path is given.

        ``meta_style`` writes what Meta's own files hold: generation-specific fields only when
        set, ``vocab_size: -1`` for the SentencePiece 32000, and ``max_seq_len`` only when it
        differs from ``context_default``, the context a reader assumes (Meta's loaders pass
        it separately and reject it in the file). Otherwise (our checkpoints' metadata) every
        field is written.
        """
        if not meta_style:
            out = dataclasses.asdict(self)
        else:
            out = {"dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads,
                   "n_layers": self.n_layers, "norm_eps": self.norm_eps,
                   "vocab_size": -1 if self.vocab_size == 32000 else self.vocab_size}
            if self.n_kv_heads is not None:
                out["n_kv_heads"] = self.n_kv_heads
            if self.ffn_dim_multiplier is not None:
                out["ffn_dim_multiplier"] = self.ffn_dim_multiplier
            if self.rope_theta != 10000.0:
                out["rope_theta"] = self.rope_theta
            if self.use_scaled_rope:
                out["use_scaled_rope"] = True
                if self.rope_scaling_factor != 8.0:
                    out["rope_scaling_factor"] = self.rope_scaling_factor
            if self.max_seq_len != context_default:
                out["max_seq_len"] = self.max_seq_len
            out = dict(sorted(out.items()))
        if path is not None:
            atomic_write(path, lambda f: json.dump(out, f, indent=2))
        return out

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


def model_differences(saved: dict, expected: dict) -> list[str]:
    """The fields in which two models' recorded params differ, defaults filled in first (a
    checkpoint written before a field existed records only what it knew of)."""
    def full(fields: dict) -> dict:
        try:
            return dataclasses.asdict(LlamaConfig.from_dict(fields))
        except ConfigError:
            return dict(fields)

    a, b = full(saved), full(expected)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


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
        context_parallel_size=layout.cp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        account_for_embedding_in_pipeline_split=layout.embedding_and_loss_as_layers,
        account_for_loss_in_pipeline_split=layout.embedding_and_loss_as_layers,
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
