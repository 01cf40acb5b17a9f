"""`megatron-llama convert`: detect the input format and run the right reader and writer.

Formats: ``meta`` (params.json + consolidated.NN.pth), ``megatron`` (a `pretrain` checkpoint
root), ``hf`` (Hugging Face LlamaForCausalLM directory, safetensors), ``deepspeed`` (a
`pretrain --engine deepspeed` checkpoint root; input only). Every pair except
Megatron -> Megatron (a checkpoint already loads under any layout); Meta -> Meta re-shards
and changes dtype.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from megatron_llama.checkpoint_files import (
    TAG_PREFIX,
    is_deepspeed_root,
    is_megatron_root,
)
from megatron_llama.errors import ConfigError
from megatron_llama.fileio import check_replaceable

if TYPE_CHECKING:
    from megatron_llama.convert.source import WeightSource

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Meta's original shard counts by model width (LLaMA-1 release).
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


def default_meta_shards(cfg, fallback: int) -> int:
    """Meta's file count for this model: the release's (Llama 3.1 405B: 8) when the shape is
    a known release, else by width (LLaMA's 1/2/4/8), else ``fallback`` (the input's)."""
    from megatron_llama.model.presets import preset_of

    preset = preset_of(cfg)
    return preset.meta_shards if preset else META_SHARDS_BY_DIM.get(cfg.dim, fallback)


def detect_format(path: str) -> str:
    """'meta', 'megatron' or 'hf' from a directory's contents; one line if none fits."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: input directory not found")
    names = set(os.listdir(path))
    if "params.json" in names and any(n.startswith("consolidated.") for n in names):
        return "meta"
    if is_megatron_root(path):
        return "megatron"
    if is_deepspeed_root(path):
        return "deepspeed"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(os.path.abspath(path)).startswith(TAG_PREFIX) and (
            is_megatron_root(parent) or is_deepspeed_root(parent)):
        raise ConfigError(f"{path}: one iteration of a checkpoint; pass the checkpoint's root "
                          f"{parent} (its latest iteration is read)")
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return "hf"
    raise ConfigError(f"{path}: unknown checkpoint format (expected Meta params.json + "
                      "consolidated.NN.pth, a megatron-llama or DeepSpeed checkpoint root, or "
                      "a Hugging Face model directory)")


def is_adapter_checkpoint(path: str) -> bool:
    """Whether ``path`` is the root of a LoRA run's checkpoints (adapters only)."""
    from megatron_llama.convert.megatron_checkpoint import read_metadata

    return detect_format(path) == "megatron" and bool(read_metadata(path)[1].get("adapters_only"))


def open_source(path: str, base: Optional[str] = None) -> "WeightSource":
    """The reader for the checkpoint at ``path`` (format detected); use it as a context.
    A LoRA run's adapter checkpoint reads as its base with the adapters merged (``base``:
    that base's directory, if not the one the run recorded)."""
    source = detect_format(path)
    if source == "megatron" and is_adapter_checkpoint(path):
        from megatron_llama.convert.lora_merge import LoraMergedSource, recorded_base

        base_source = open_source(base or recorded_base(path))
        try:
            return LoraMergedSource(path, base_source)
        except BaseException:
            base_source.close()
            raise
    if source == "meta":
        from megatron_llama.convert.meta import MetaCheckpoint

        return MetaCheckpoint(path)
    if source == "hf":
        from megatron_llama.convert.hf import HFCheckpoint

        return HFCheckpoint(path)
    if source == "deepspeed":
        from megatron_llama.convert.deepspeed_checkpoint import DeepSpeedCheckpoint

        return DeepSpeedCheckpoint(path)
    from megatron_llama.convert.megatron_checkpoint import MegatronCheckpoint

    return MegatronCheckpoint(path)


def check_output_apart(input_dir: str, output_dir: str) -> None:
    """Refuse an output that is the input, contains it or lies inside it, ``--force`` or not:
    replacing it would delete the input (or write into it)."""
    inp, out = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if out == inp:
        raise ConfigError(f"{output_dir}: is the input itself; choose another --output")
    if os.path.commonpath([inp, out]) == out:
        raise ConfigError(f"{output_dir}: contains the input {input_dir}; replacing it would "
                          "delete the input: choose an --output outside it")
    if os.path.commonpath([inp, out]) == inp:
        raise ConfigError(f"{output_dir}: lies inside the input {input_dir}; choose an "
                          "--output outside it")


def convert(input_dir: str, output_dir: str, to: str, *, shards: Optional[int] = None,
            tp: int = 1, pp: int = 1, dtype: Optional[str] = None, force: bool = False,
            progress: bool = True, base: Optional[str] = None) -> str:
    """Convert ``input_dir`` to format ``to`` in ``output_dir``; returns a one-line summary.

    Tensors stream from the reader to the writer one at a time (one layer at most in memory);
    ``progress`` shows a bar advancing per layer. A LoRA run's checkpoint is written merged
    into its base (``base`` overrides the base the run recorded).
    """
    check_output_apart(input_dir, output_dir)
    source_format = detect_format(input_dir)
    if source_format == "megatron" and is_adapter_checkpoint(input_dir):
        source_format = "lora"
    elif base is not None:
        raise ConfigError(f"{input_dir}: --base applies to LoRA adapter checkpoints only")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
    if source_format == to and to != "meta":
        why = {"megatron": "a Megatron checkpoint already loads under any layout",
               "hf": "copy the directory, or convert to meta to re-shard or change dtype"}
        raise ConfigError(f"{input_dir}: conversion {to} -> {to} is not supported "
                          f"({why.get(to, 'nothing to convert')})")
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise ConfigError(f"{output_dir}: output must differ from the input")
    if os.path.exists(output_dir) and not force:
        raise ConfigError(f"{output_dir}: already exists (pass --force to replace it)")
    check_replaceable(output_dir, "convert")  # --force never replaces a user's directory
    with open_source(input_dir, base) as source:
        cfg = source.config
        out_dtype = DTYPES[dtype] if dtype else source.dtype
        if to == "meta":
            from megatron_llama.convert.meta import write_meta

            n = shards or default_meta_shards(cfg, getattr(source, "num_shards", 1))
            write_meta(output_dir, source, n, dtype=out_dtype, force=force, progress=progress)
            target = f"Meta format, {n} shard(s)"
        elif to == "hf":
            from megatron_llama.convert.hf import write_hf

            write_hf(output_dir, source, dtype=out_dtype, force=force, progress=progress)
            target = "Hugging Face LlamaForCausalLM"
        else:
            from megatron_llama.convert.megatron_checkpoint import write_megatron

            write_megatron(output_dir, source, dtype=out_dtype, tp=tp, pp=pp, force=force,
                           progress=progress)
            target = (f"Megatron checkpoint (model only, for TP={tp} PP={pp}; loads under "
                      "any layout)")
    return (f"wrote {output_dir}: {target}, {out_dtype}, {cfg.num_params():,} parameters "
            f"(from {source.description})")
