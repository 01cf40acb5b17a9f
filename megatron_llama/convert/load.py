"""Any checkpoint straight into this rank's model chunks, for inference (generate, evaluate).

Meta and Hugging Face directories and LoRA runs (merged into their base) are read through
their checkpoint readers, one layer at a time and only the layers this rank holds
(`model.build.load_weights`); a megatron-llama checkpoint loads through dist_checkpointing,
resharded to the current layout. Process groups must exist (`parallel.initialize`).
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig


def checkpoint_config(checkpoint: str) -> tuple[LlamaConfig, Optional[str], str]:
    """(model config, tokenizer path if the checkpoint names one that exists, format) of a
    checkpoint directory, without reading its tensors."""
    from megatron_llama.convert.run import detect_format, is_adapter_checkpoint, open_source

    source = detect_format(checkpoint)
    if source == "deepspeed":
        raise ConfigError(f"{checkpoint}: a DeepSpeed checkpoint; convert it first "
                          "(megatron-llama convert --to meta)")
    if source == "megatron" and not is_adapter_checkpoint(checkpoint):
        from megatron_llama.convert.megatron_checkpoint import read_metadata

        _, meta = read_metadata(checkpoint)
        cfg, tokenizer = LlamaConfig.from_dict(meta["model"]), meta.get("tokenizer")
    else:
        with open_source(checkpoint) as reader:
            cfg, tokenizer = reader.config, reader.tokenizer
            source = "lora" if source == "megatron" else source
    return cfg, (tokenizer if tokenizer and os.path.isfile(tokenizer) else None), source


def load_into(chunks: list, cfg: LlamaConfig, checkpoint: str, source: str) -> None:
    """Fill this rank's ``chunks`` from ``checkpoint`` (format ``source`` from
    `checkpoint_config`)."""
    if source in ("meta", "hf", "lora"):
        from megatron_llama.convert.run import open_source
        from megatron_llama.model.build import load_weights

        with open_source(checkpoint) as reader:
            load_weights(chunks, cfg, reader.tensor)
        return
    from megatron.core import dist_checkpointing

    from megatron_llama.compat.safe_loading import reading
    from megatron_llama.convert.megatron_checkpoint import read_metadata

    path, _ = read_metadata(checkpoint)
    with reading(path):  # no pickled code runs
        loaded = dist_checkpointing.load(
            {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}, path)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=True)
