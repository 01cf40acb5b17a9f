"""`megatron-llama convert`: detect the input format and run the right reader and writer.

Formats: ``meta`` (params.json + consolidated.NN.pth), ``megatron`` (a `pretrain` checkpoint
root), ``hf`` (Hugging Face LlamaForCausalLM directory). Implemented so far: Meta -> Meta
(re-sharding to 1/2/4/8 files, dtype change); the Megatron and Hugging Face readers and
writers are the next step of the conversion issue and are refused with one line until then.
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
            dtype: Optional[str] = None, force: bool = False, progress: bool = True) -> str:
    """Convert ``input_dir`` to format ``to`` in ``output_dir``; returns a one-line summary."""
    from tqdm import tqdm

    from megatron_llama.convert.meta import MetaCheckpoint, write_meta

    source = detect_format(input_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
    if (source, to) != ("meta", "meta"):
        raise ConfigError(f"conversion {source} -> {to} is not implemented yet "
                          "(available: meta -> meta)")
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ConfigError(f"{output_dir}: output must differ from the input")
    ckpt = MetaCheckpoint(input_dir)
    n = shards or META_SHARDS_BY_DIM.get(ckpt.config.dim, ckpt.num_shards)
    out_dtype = DTYPES[dtype] if dtype else ckpt.dtype
    bar = (lambda it: tqdm(it, desc="shards", unit="shard")) if progress else None
    write_meta(output_dir, ckpt.config, ckpt.tensor, n, dtype=out_dtype,
               tokenizer=ckpt.tokenizer, force=force, progress=bar)
    return (f"wrote {output_dir}: Meta format, {n} shard(s), {out_dtype}, "
            f"{ckpt.config.num_params():,} parameters (from {ckpt.num_shards} shard(s))")
