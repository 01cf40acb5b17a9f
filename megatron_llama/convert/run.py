"""`megatron-llama convert`: detect the input format and run the right reader and writer.

Formats: ``meta`` (params.json + consolidated.NN.pth), ``megatron`` (a `pretrain` checkpoint
root), ``hf`` (Hugging Face LlamaForCausalLM directory, safetensors). Every pair except
Megatron -> Megatron (a checkpoint already loads under any layout); Meta -> Meta re-shards
and changes dtype.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_llama.config import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Meta's original shard counts by model width (LLaMA-1 release).
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


def detect_format(path: str) -> str:
    """'meta', 'megatron' or 'hf' from a directory's contents; one line if none fits."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: input directory not found")
    names = set(os.listdir(path))
    if "params.json" in names and any(n.startswith("consolidated.") for n in names):
        return "meta"
    if "latest_checkpointed_iteration.txt" in names:
        return "megatron"
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return "hf"
    raise ConfigError(f"{path}: unknown checkpoint format (expected Meta params.json + "
                      "consolidated.NN.pth, a megatron-llama checkpoint root, or a Hugging "
                      "Face model directory)")


def convert(input_dir: str, output_dir: str, to: str, *, shards: Optional[int] = None,
            tp: int = 1, pp: int = 1, dtype: Optional[str] = None, force: bool = False,
            progress: bool = True) -> str:
    """Convert ``input_dir`` to format ``to`` in ``output_dir``; returns a one-line summary."""
    from tqdm import tqdm

    from megatron_llama.convert.meta import MetaCheckpoint, write_meta

    source = detect_format(input_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
    if source == to and source != "meta":
        raise ConfigError(f"conversion {source} -> {to} is not supported (a Megatron checkpoint "
                          "already loads under any layout)")
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ConfigError(f"{output_dir}: output must differ from the input")
    if os.path.exists(output_dir) and not force:
        raise ConfigError(f"{output_dir}: already exists (pass --force to replace it)")
    if source == "meta":
        ckpt = MetaCheckpoint(input_dir)
        cfg, get_tensor, in_dtype, tokenizer = ckpt.config, ckpt.tensor, ckpt.dtype, ckpt.tokenizer
        in_shards = ckpt.num_shards
        origin = f"Meta, {in_shards} shard(s)"
    elif source == "hf":
        from megatron_llama.convert.hf import HFCheckpoint

        ckpt = HFCheckpoint(input_dir)
        cfg, get_tensor, in_dtype, tokenizer = ckpt.config, ckpt.tensor, ckpt.dtype, ckpt.tokenizer
        in_shards = 1
        origin = "Hugging Face"
    else:
        from megatron_llama.convert.megatron import read_megatron

        cfg, weights, meta = read_megatron(input_dir)
        get_tensor, in_dtype = weights.__getitem__, next(iter(weights.values())).dtype
        tokenizer = meta.get("tokenizer") if meta.get("tokenizer") and os.path.isfile(
            meta["tokenizer"]) else None
        in_shards = 1
        origin = f"Megatron, saved at {meta.get('layout')}"
    out_dtype = DTYPES[dtype] if dtype else in_dtype
    if to == "meta":
        n = shards or META_SHARDS_BY_DIM.get(cfg.dim, in_shards)
        bar = (lambda it: tqdm(it, desc="shards", unit="shard")) if progress else None
        write_meta(output_dir, cfg, get_tensor, n, dtype=out_dtype, tokenizer=tokenizer,
                   force=force, progress=bar)
        target = f"Meta format, {n} shard(s)"
    elif to == "hf":
        from megatron_llama.convert.hf import write_hf

        write_hf(output_dir, cfg, get_tensor, dtype=out_dtype, tokenizer=tokenizer, force=force)
        target = "Hugging Face LlamaForCausalLM"
    else:
        from megatron_llama.convert.canonical import meta_keys
        from megatron_llama.convert.megatron import write_megatron

        weights = {k: get_tensor(k) for k in meta_keys(cfg)}
        write_megatron(output_dir, cfg, weights, dtype=out_dtype, tp=tp, pp=pp,
                       tokenizer=tokenizer, force=force)
        target = f"Megatron checkpoint (model only, for TP={tp} PP={pp}; loads under any layout)"
    return (f"wrote {output_dir}: {target}, {out_dtype}, {cfg.num_params():,} parameters "
            f"(from {origin})")
