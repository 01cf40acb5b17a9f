"""Hugging Face ``LlamaForCausalLM`` directories: written and read without transformers.

Layout: ``config.json``, ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
(or one ``model.safetensors``), ``tokenizer.model`` with a ``tokenizer_config.json``.
Names map one to one onto Meta's; Hugging Face's rotary embedding rotates halves like
megatron-core, so wq/wk rows are permuted inside each head exactly as for megatron-core
(`canonical.rope_to_half_split`), which is also what Hugging Face's own conversion script
does. Files of at most ``max_shard_bytes`` are planned from the shapes, then every tensor is
streamed into its file as it comes (memory: one tensor); reading uses plain file reads.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_llama.convert.source import WeightSource
from megatron_llama.convert.tensorio import SafetensorsFile, SafetensorsWriter
from megatron_llama.data.tiktoken_bpe import LLAMA3_BOS_ID, LLAMA3_EOS_ID
from megatron_llama.errors import ConfigError, read_json_object
from megatron_llama.fileio import write_json
from megatron_llama.model.canonical import (
    META_LAYER_KEYS,
    full_shape,
    meta_keys,
    rope_to_half_split,
    rope_to_interleaved,
)
from megatron_llama.model.config import (
    ROPE_HIGH_FREQ_FACTOR,
    ROPE_LOW_FREQ_FACTOR,
    ROPE_ORIGINAL_CONTEXT,
    LlamaConfig,
)
from megatron_llama.model.presets import preset_of, with_released_ffn_rule

LAYER_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight",
               "attention.wk.weight": "self_attn.k_proj.weight",
               "attention.wv.weight": "self_attn.v_proj.weight",
               "attention.wo.weight": "self_attn.o_proj.weight",
               "feed_forward.w1.weight": "mlp.gate_proj.weight",
               "feed_forward.w3.weight": "mlp.up_proj.weight",
               "feed_forward.w2.weight": "mlp.down_proj.weight",
               "attention_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight"}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def hf_name(meta_name: str) -> str:
    if meta_name in TOP_NAMES:
        return TOP_NAMES[meta_name]
    _, i, suffix = meta_name.split(".", 2)
    return f"model.layers.{i}.{LAYER_NAMES[suffix]}"


def _permute_qk(meta_name: str, tensor: torch.Tensor, cfg: LlamaConfig, permute) -> torch.Tensor:
    if meta_name.endswith("attention.wq.weight"):
        return permute(tensor, cfg.n_heads)
    if meta_name.endswith("attention.wk.weight"):
        return permute(tensor, cfg.num_kv_heads)
    return tensor


def to_hf(meta_name: str, tensor: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Meta tensor -> Hugging Face tensor (q/k rows permuted to the half-split rotary)."""
    return _permute_qk(meta_name, tensor, cfg, rope_to_half_split)


def from_hf(meta_name: str, tensor: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Inverse of `to_hf`."""
    return _permute_qk(meta_name, tensor, cfg, rope_to_interleaved)


def hf_rope_scaling(cfg: LlamaConfig) -> Optional[dict]:
    """Llama 3.1's RoPE scaling as transformers names it (None without scaling)."""
    if not cfg.use_scaled_rope:
        return None
    return {"rope_type": "llama3", "factor": float(cfg.rope_scaling_factor),
            "low_freq_factor": ROPE_LOW_FREQ_FACTOR, "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT}


def _rope_scaling_from_hf(path: str, scaling) -> tuple[bool, float]:
    """(use_scaled_rope, factor) of config.json's rope_scaling; other schemes refused."""
    if scaling is None:
        return False, 8.0
    if not isinstance(scaling, dict):
        raise ConfigError(f"{path}: rope_scaling must be an object or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"{path}: rope_scaling type {kind!r} is not supported (only Llama "
                          "3.1's 'llama3')")
    fixed = {"low_freq_factor": ROPE_LOW_FREQ_FACTOR, "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
             "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT}
    for key, value in fixed.items():
        if scaling.get(key, value) != value:
            raise ConfigError(f"{path}: rope_scaling.{key}={scaling[key]} differs from Llama "
                              f"3.1's {value:g}, which megatron-core's scaling fixes")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(f"{path}: rope_scaling.factor={factor!r} must be a number >= 1")
    return True, float(factor)


def special_ids(cfg: LlamaConfig, tokenizer_path: Optional[str]) -> tuple[int, int]:
    """(bos, eos) of the model's generation: from its tokenizer file when there is one, else
    from the release with this architecture (Llama 3.x: 128000/128001), else LLaMA's 1/2."""
    if tokenizer_path:
        from megatron_llama.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_path)
        return tok.bos_id, tok.eos_id
    preset = preset_of(cfg)
    if preset is not None and preset.tokenizer == "tiktoken":
        return LLAMA3_BOS_ID, LLAMA3_EOS_ID
    return 1, 2


def hf_config(cfg: LlamaConfig, dtype: torch.dtype, bos_eos: tuple[int, int] = (1, 2)) -> dict:
    """config.json for transformers' LlamaForCausalLM."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden_size,
            "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_scaling": hf_rope_scaling(cfg),
            "tie_word_embeddings": False, "bos_token_id": bos_eos[0], "eos_token_id": bos_eos[1],
            "torch_dtype": DTYPE_NAMES[dtype], "initializer_range": 0.02, "use_cache": True,
            # Meta's FFN rounding cannot be recovered from intermediate_size alone:
            "megatron_llama": {"multiple_of": cfg.multiple_of,
                               "ffn_dim_multiplier": cfg.ffn_dim_multiplier}}


def config_from_hf(path: str) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json (one line if it is not a Llama)."""
    raw = read_json_object(path)
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{path}: model_type {raw.get('model_type')!r} is not 'llama'")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size", "rms_norm_eps") if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")
    extra = raw.get("megatron_llama") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: megatron_llama must be an object")
    # Our exports keep Meta's rounding; for others, rounding up to intermediate_size itself
    # reproduces it whenever it is at least int(8 * dim / 3) (every LLaMA).
    multiple_of = extra.get("multiple_of") or raw["intermediate_size"]
    scaled, factor = _rope_scaling_from_hf(path, raw.get("rope_scaling"))
    try:
        cfg = LlamaConfig(dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
                          n_heads=raw["num_attention_heads"],
                          n_kv_heads=(raw.get("num_key_value_heads")
                                      if raw.get("num_key_value_heads") != raw["num_attention_heads"]
                                      else None),
                          vocab_size=raw["vocab_size"], multiple_of=multiple_of,
                          ffn_dim_multiplier=extra.get("ffn_dim_multiplier"),
                          norm_eps=raw["rms_norm_eps"],
                          max_seq_len=raw.get("max_position_embeddings", 2048),
                          rope_theta=float(raw.get("rope_theta", 10000.0)),
                          use_scaled_rope=scaled, rope_scaling_factor=factor)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.ffn_hidden_size != raw["intermediate_size"]:
        raise ConfigError(f"{path}: intermediate_size {raw['intermediate_size']} does not follow "
                          "LLaMA's FFN rule for this width")
    return cfg if extra else with_released_ffn_rule(cfg)


def _file_plan(cfg: LlamaConfig, dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Meta names grouped, in order, into files of at most ``max_bytes`` (shapes only)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    files: list[list[str]] = [[]]
    size = 0
    for key in meta_keys(cfg):
        n = itemsize
        for dim in full_shape(key, cfg):
            n *= dim
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(key)
        size += n
    return files


def write_hf(output: str, source: WeightSource, *, dtype: Optional[torch.dtype] = None,
             force: bool = False, max_shard_bytes: int = 5 * 2**30,
             progress: bool = False) -> str:
    """Write a Hugging Face directory from any reader, streamed tensor by tensor (atomic)."""
    from tqdm import tqdm

    from megatron_llama.fileio import staged_directory

    cfg = source.config
    dtype = dtype or source.dtype
    plan = _file_plan(cfg, dtype, max_shard_bytes)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    with staged_directory(output, force, owner="convert") as tmp, \
            tqdm(total=cfg.n_layers, unit="layer", desc="hf", disable=not progress) as bar:
        for name, keys in zip(names, plan):
            writer = SafetensorsWriter(os.path.join(tmp, name),
                                       [(hf_name(k), full_shape(k, cfg), dtype) for k in keys])
            for key in keys:
                writer.write(hf_name(key), to_hf(key, source.tensor(key).to(dtype), cfg))
                if key.endswith(META_LAYER_KEYS[-1]):
                    bar.update(1)
            writer.close()
        if len(plan) > 1:
            weight_map = {hf_name(k): name for name, keys in zip(names, plan) for k in keys}
            total_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in names)
            write_json({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                       os.path.join(tmp, "model.safetensors.index.json"))
        write_json(hf_config(cfg, dtype, special_ids(cfg, source.tokenizer)),
                   os.path.join(tmp, "config.json"))
        if source.tokenizer:  # tokenizer.json etc.: AutoTokenizer encodes as we do
            write_hf_tokenizer(source.tokenizer, tmp, cfg.max_seq_len)
    return output


def write_hf_tokenizer(tokenizer_path: str, out_dir: str, max_length: int) -> list[str]:
    """Hugging Face tokenizer files for ``tokenizer_path``, of whichever kind it is."""
    from megatron_llama.data.tokenizer import Tokenizer

    if Tokenizer(tokenizer_path).kind == "tiktoken":
        from megatron_llama.convert.hf_tiktoken import write_hf_tiktoken_files

        return write_hf_tiktoken_files(tokenizer_path, out_dir, max_length)
    from megatron_llama.convert.hf_tokenizer import write_hf_tokenizer_files

    return write_hf_tokenizer_files(tokenizer_path, out_dir)


class HFCheckpoint(WeightSource):
    """A Hugging Face Llama directory (safetensors), read one tensor at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.config = config_from_hf(os.path.join(directory, "config.json"))
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise ConfigError(f"{directory}: no .safetensors files (pytorch .bin is not read: "
                              "it would need unpickling)")
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            path = os.path.join(directory, f)
            try:
                handle = SafetensorsFile(path)
            except (ValueError, OSError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}: truncated or corrupt safetensors file ({e})") from None
            for key in handle.keys():
                self.where[key] = handle
        dtypes = set()
        for key in meta_keys(self.config):
            name = hf_name(key)
            if name not in self.where:
                raise ConfigError(f"{directory}: missing tensor {name}")
            handle = self.where[name]
            if handle.shape(name) != full_shape(key, self.config):
                raise ConfigError(f"{handle.path}: {name} has shape {handle.shape(name)}, "
                                  f"config.json implies {full_shape(key, self.config)}")
            dtypes.add(handle.dtype(name))
        if len(dtypes) > 1:
            raise ConfigError(f"{directory}: tensors mix dtypes {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        # Meta's own tokenizer file: beside the weights (our exports, Llama 2 repos) or in
        # original/ (Meta's Llama 3.x repos on the Hugging Face hub)
        candidates = [os.path.join(directory, "tokenizer.model"),
                      os.path.join(directory, "original", "tokenizer.model")]
        self.tokenizer = next((c for c in candidates if os.path.isfile(c)), None)
        self.description = "Hugging Face"

    def tensor(self, meta_name: str) -> torch.Tensor:
        name = hf_name(meta_name)
        return from_hf(meta_name, self.where[name].tensor(name), self.config)
