"""The Megatron side of conversion: `pretrain`'s dist_checkpointing format, read and written.

Model weights in a dist checkpoint are global tensors with their sharding recorded, so one
process can read a checkpoint saved under any TP/PP layout, and a checkpoint written by one
process loads under any layout. Conversion therefore runs in a single process (world size 1,
megatron-core's TP=1 PP=1 model) and goes through the pure mappings of `canonical.py`.

A converted checkpoint holds the model only (``"model_only": true`` in its
``megatron_llama.json``): `pretrain --load` then starts from these weights at step 0 with a
fresh optimizer. Limitation for now: the whole model is materialised once in memory (the
streaming, layer-by-layer path is the Meta <-> Meta one).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_llama.config import ConfigError, LlamaConfig
from megatron_llama.training.checkpoint import (METADATA, TRACKER, iteration_dir,
                                                latest_iteration)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def read_metadata(root: str) -> tuple[str, dict]:
    """(path of the latest checkpoint, its megatron_llama.json) under a checkpoint root."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise ConfigError(f"{root}: no {TRACKER}: not a megatron-llama checkpoint root")
    path = iteration_dir(root, iteration)
    meta_path = os.path.join(path, METADATA)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{path}: missing {METADATA} (model config); cannot convert")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if "model" not in meta:
        raise ConfigError(f"{meta_path}: no model config")
    return path, meta


class _SingleProcessModel:
    """A TP=1 PP=1 megatron-core model in this process, process groups torn down on exit."""

    def __init__(self, cfg: LlamaConfig, dtype: str):
        self.cfg, self.dtype = cfg, dtype

    def __enter__(self):
        from megatron_llama.config import to_transformer_config
        from megatron_llama.model import build_model
        from megatron_llama.parallel import ParallelLayout, init_distributed, initialize

        _, world = init_distributed()
        if world != 1:
            raise ConfigError("conversion runs in one process; do not launch it with torchrun")
        initialize(ParallelLayout())
        tconfig = to_transformer_config(self.cfg, ParallelLayout(), dtype=self.dtype)
        return build_model(self.cfg, tconfig)[0]

    def __exit__(self, *exc):
        from megatron_llama.parallel import destroy

        destroy()


def read_megatron(root: str) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict]:
    """(config, full Meta-named state dict, metadata) of the latest checkpoint under ``root``."""
    from megatron.core import dist_checkpointing

    from megatron_llama.convert.canonical import megatron_to_meta

    path, meta = read_metadata(root)
    cfg = LlamaConfig.from_dict(meta["model"], source=os.path.join(path, METADATA))
    dtype = meta.get("dtype", "fp32")
    with _SingleProcessModel(cfg, dtype) as model:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
        model.load_state_dict(loaded["model"], strict=True)
        local = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if not k.endswith("_extra_state")}
    return cfg, megatron_to_meta({(0, 0, 0): local}, cfg), meta


def write_megatron(output: str, cfg: LlamaConfig, weights: dict[str, torch.Tensor], *,
                   dtype: Optional[torch.dtype] = None, tp: int = 1, pp: int = 1,
                   tokenizer: Optional[str] = None, force: bool = False) -> str:
    """Write Meta-named ``weights`` as a model-only checkpoint root `pretrain` can load.

    ``tp``/``pp`` are recorded as the intended layout and checked against the model; the
    files themselves load under any layout.
    """
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_llama.convert.meta import commit_output, prepare_output
    from megatron_llama.model import load_meta_state_dict
    from megatron_llama.parallel import ParallelLayout

    ParallelLayout(tp=tp, pp=pp).check(cfg)
    dtype = dtype or next(iter(weights.values())).dtype
    tmp = prepare_output(output, force)
    try:
        path = iteration_dir(tmp, 0)
        os.makedirs(path)
        with _SingleProcessModel(cfg, DTYPE_NAMES[dtype]) as model:
            load_meta_state_dict([model], {k: v.to(dtype) for k, v in weights.items()}, cfg)
            dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
        with open(os.path.join(path, METADATA), "w", encoding="utf-8") as f:
            json.dump({"model": cfg.to_params_json(meta_style=False),
                       "layout": {"tp": tp, "pp": pp, "vp": None}, "dtype": DTYPE_NAMES[dtype],
                       "tokenizer": (os.path.join(os.path.abspath(output), "tokenizer.model")
                                     if tokenizer else None),
                       "model_only": True}, f, indent=1)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, TRACKER), "w", encoding="utf-8") as f:
            f.write("0")
        commit_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
