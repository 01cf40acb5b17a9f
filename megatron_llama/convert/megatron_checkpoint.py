"""The Megatron side of conversion: `pretrain`'s dist_checkpointing format, read and written.

Model weights in a dist checkpoint are global tensors with their sharding recorded, so one
process can read a checkpoint saved under any TP/PP layout, and a checkpoint written by one
process loads under any layout. Conversion therefore runs in a single process (world size 1,
megatron-core's TP=1 PP=1 model) and goes through the pure mappings of `canonical.py`.

Both directions stream, so memory stays near one layer whatever the model size:
- reading loads one layer at a time (a partial `dist_checkpointing.load` of that layer's slice
  of each stacked ``decoder.layers.*`` tensor; torch.distributed.checkpoint reads only those
  bytes), converted to Meta's names by `canonical.layer_to_meta`;
- writing builds the model on the meta device (no memory) to get megatron-core's exact
  sharded state dict (keys, global shapes, the SwiGLU fc1 split), then saves it with
  torch.distributed.checkpoint through a save planner whose `resolve_data` produces each
  tensor on demand from the source, one layer at a time (`_StreamingSave`).

A converted checkpoint holds the model only (``"model_only": true`` in its
``megatron_llama.json``): `pretrain --load` then starts from these weights at step 0 with a
fresh optimizer.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_llama.checkpoint_files import (
    METADATA,
    TRACKER,
    iteration_dir,
    latest_iteration,
)
from megatron_llama.convert.source import WeightSource, refuse_if_damaged
from megatron_llama.resilience.integrity import checksum_files, list_files
from megatron_llama.errors import ConfigError, read_json_object
from megatron_llama.model.canonical import (
    LAYER_NORM_NAMES,
    META_LAYER_KEYS,
    layer_index,
    layer_to_megatron,
    layer_to_meta,
    vocab_to_megatron,
    vocab_to_meta,
)
from megatron_llama.model.config import LlamaConfig

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
    meta = read_json_object(meta_path)
    if not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{meta_path}: no model config")
    return path, meta


def describe_layout(layout) -> str:
    """``{'tp': 2, 'pp': 1, 'vp': None}`` as ``TP=2 PP=1`` (what the metadata records)."""
    if not isinstance(layout, dict):
        return "an unrecorded layout"
    parts = [f"{k.upper()}={layout[k]}" for k in ("tp", "pp", "vp") if layout.get(k)]
    return " ".join(parts) or "an unrecorded layout"


class _ProcessGroup:
    """torch.distributed with world size 1 and megatron-core's TP=1 PP=1 groups, torn down on
    exit (conversion runs in one process whatever layout saved or will load the checkpoint)."""

    def __enter__(self):
        from megatron_llama.parallel import ParallelLayout, init_distributed, initialize

        _, world = init_distributed()
        if world != 1:
            raise ConfigError("conversion runs in one process; do not launch it with torchrun")
        initialize(ParallelLayout())
        return self

    def __exit__(self, *exc):
        from megatron_llama.parallel import destroy

        destroy()


# megatron-core's stacked keys of one layer (global shape [n_layers, ...]) -> local-spec suffix.
LAYER_PREFIX = "decoder.layers."
TOP_KEYS = {"embedding.word_embeddings.weight": "tok_embeddings.weight",
            "decoder.final_layernorm.weight": "norm.weight", "output_layer.weight": "output.weight"}


class MegatronCheckpoint(WeightSource):
    """The latest checkpoint under a `pretrain` root, read one layer at a time.

    Reads go straight through torch.distributed.checkpoint (``no_dist``: no process group),
    each tensor request naming only the region it needs: one layer's slice of a stacked
    ``decoder.layers.*`` tensor, or a whole top-level tensor.
    """

    def __init__(self, root: str):
        from megatron_llama.compat.safe_loading import check_metadata, install

        install()  # DCP's metadata and bytes items: no pickled code runs
        self.path, meta = read_metadata(root)
        check_metadata(self.path)
        refuse_if_damaged(self.path)
        self.config = LlamaConfig.from_dict(meta["model"],
                                            source=os.path.join(self.path, METADATA))
        tok = meta.get("tokenizer")
        self.tokenizer = tok if tok and os.path.isfile(tok) else None
        self.description = f"Megatron, saved at {describe_layout(meta.get('layout'))}"
        if meta.get("adapters_only"):
            raise ConfigError(f"{self.path}: holds LoRA adapters only; merge them into their "
                              "base with `megatron-llama merge-lora`")
        self._shapes = stored_shapes(self.path)
        te = f"{LAYER_PREFIX}self_attention.linear_qkv.layer_norm_weight" in self._shapes
        self.names = "te" if te else "local"
        self._suffixes = ["self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                          "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
                          *LAYER_NORM_NAMES[self.names].values()]
        wanted = list(TOP_KEYS) + [LAYER_PREFIX + s for s in self._suffixes]
        missing = [k for k in wanted if k not in self._shapes]
        if missing:
            raise ConfigError(f"{self.path}: no tensor {missing[0]} (not a LLaMA checkpoint of "
                              "megatron-llama?)")
        layers = self._shapes[LAYER_PREFIX + self._suffixes[0]][0][0]
        if layers != self.config.n_layers:
            raise ConfigError(f"{self.path}: {layers} layers stored, {METADATA} says "
                              f"{self.config.n_layers}")
        self.dtype = self._shapes["output_layer.weight"][1]
        self._layer: tuple[int, dict[str, torch.Tensor]] = (-1, {})

    def _load(self, request: dict[str, tuple[str, Optional[int]]]) -> dict[str, torch.Tensor]:
        return read_regions(self.path, self._shapes, request)

    def tensor(self, name: str) -> torch.Tensor:
        i = layer_index(name)
        if i is None:
            key = next(k for k, v in TOP_KEYS.items() if v == name)
            t = self._load({name: (key, None)})[name]
            return vocab_to_meta([t], self.config) if key != "decoder.final_layernorm.weight" else t
        if self._layer[0] != i:  # one layer in memory at a time
            self._layer = (-1, {})
            loaded = self._load({s: (LAYER_PREFIX + s, i) for s in self._suffixes})
            self._layer = (i, layer_to_meta([loaded], self.config, self.names))
        return self._layer[1][name.split(".", 2)[2]]


def stored_shapes(path: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """{key: (global shape, dtype)} of every tensor a dist checkpoint folder stores; one line
    if its metadata is unreadable or a data file is short."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - torch DCP raises many types for a bad file
        raise ConfigError(f"{path}: unreadable checkpoint metadata ({e})") from None
    _check_storage_sizes(path, metadata)
    return {k: (tuple(v.size), v.properties.dtype)
            for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def read_regions(path: str, shapes: dict, request: dict[str, tuple[str, Optional[int]]]
                 ) -> dict[str, torch.Tensor]:
    """Load {name: (checkpoint key, layer or None)} from the dist checkpoint at ``path``: a
    whole tensor, or one layer's slice of a stacked ``decoder.layers.*`` tensor."""
    import torch.distributed.checkpoint as dcp

    from megatron_llama.compat.safe_loading import reading

    state, regions, out = {}, {}, {}
    for name, (key, layer) in request.items():
        shape, dtype = shapes[key]
        if layer is None:
            state[key], regions[key] = torch.empty(shape, dtype=dtype), [0] * len(shape)
        else:  # [layer:layer+1, ...] of the stacked tensor
            state[key] = torch.empty((1, *shape[1:]), dtype=dtype)
            regions[key] = [layer] + [0] * (len(shape) - 1)
        out[name] = state[key] if layer is None else state[key][0]
    with reading(path):  # tensors only, but the same guard
        dcp.load(state, storage_reader=dcp.FileSystemReader(path),
                 planner=_region_planner(regions), no_dist=True)
    return out


def _check_storage_sizes(path: str, metadata) -> None:
    """One line if a data file is missing or shorter than the metadata says (truncated copy)."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size is None or size < end:
            raise ConfigError(f"{file}: {'missing' if size is None else f'{size} bytes'}, the "
                              f"checkpoint metadata needs {end} (truncated or incomplete copy)")


def _region_planner(regions: dict[str, list[int]]):
    """A DCP load planner reading, for each key, the region of the saved (global) tensor that
    starts at ``regions[key]`` and has the shape of the destination tensor."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import (
        create_read_items_for_chunk_list,
    )

    class Planner(DefaultLoadPlanner):
        def create_local_plan(self):
            items = []
            for key, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(regions[key]),
                                             sizes=tensor.size())
                items += create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):  # our destinations are plain tensors for the region
            return self.state_dict[index.fqn]

    return Planner()


class _StreamingSave:
    """megatron-core's torch_dist save, with tensors produced on demand (see module doc)."""

    def __init__(self, produce):
        from megatron.core.dist_checkpointing.strategies.torch import (
            TorchDistSaveShardedStrategy,
        )

        class Strategy(TorchDistSaveShardedStrategy):
            def save(self, sharded_state_dict, checkpoint_dir):
                import torch.distributed.checkpoint as dcp
                from megatron.core.dist_checkpointing.strategies.torch import (
                    _replace_state_dict_keys_with_sharded_keys,
                    mcore_to_pyt_state_dict,
                )

                grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                           True)
                # thread_count=1: items are written in plan order, one at a time.
                writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1,
                                              single_file_per_rank=True)
                dcp.save(mcore_to_pyt_state_dict(grouped, False), storage_writer=writer,
                         planner=_planner(produce))

        self.strategy = Strategy("torch_dist", 1)


def _planner(produce):
    """megatron-core's save planner, ordered layer by layer, data from ``produce``."""
    import dataclasses

    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class Planner(MCoreSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            order = {item.index.fqn: n for n, item in enumerate(plan.items)}

            def layer_major(item):  # embedding first, then layer 0, 1, ..., then the rest
                layered = item.index.fqn.startswith(LAYER_PREFIX) and item.index.offset
                return (item.index.offset[0] if layered else
                        (-1 if item.index.fqn.startswith("embedding") else 1 << 30),
                        order[item.index.fqn])

            self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=layer_major))
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            md = write_item.tensor_data
            return produce(write_item.index.fqn, tuple(md.chunk.offsets), tuple(md.chunk.sizes),
                           md.properties.dtype)

    return Planner(dedup_replicated_tensors=False, flatten_state_dict=False)


def write_megatron(output: str, source: WeightSource, *, dtype: Optional[torch.dtype] = None,
                   tp: int = 1, pp: int = 1, force: bool = False, progress: bool = False) -> str:
    """Write ``source`` as a model-only checkpoint root `pretrain` can load, streamed.

    ``tp``/``pp`` are recorded as the intended layout and checked against the model; the
    files themselves load under any layout.
    """
    import shutil

    from megatron.core import dist_checkpointing
    from tqdm import tqdm

    from megatron_llama.fileio import staged_directory
    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.model.spec import default_layer_backend
    from megatron_llama.parallel import ParallelLayout

    cfg = source.config
    even = ParallelLayout(tp=tp, pp=pp)
    ends = ParallelLayout(tp=tp, pp=pp, embedding_and_loss_as_layers=True)
    if cfg.n_layers % pp and pp > 1 and (cfg.n_layers + 2) % pp == 0:
        ends.check(cfg)  # e.g. 405B's 126 layers on PP=16, as pretrain runs it
    else:
        even.check(cfg)
    dtype = dtype or source.dtype
    names = "te" if default_layer_backend() == "te" else "local"
    current: dict = {"layer": None, "tensors": {}}

    def produce(key: str, offsets: tuple, sizes: tuple, want: torch.dtype) -> torch.Tensor:
        """Chunk (offsets, sizes) of megatron-core's global tensor ``key`` (TP=1 form)."""
        if key.startswith(LAYER_PREFIX):
            i, offsets, sizes = offsets[0], offsets[1:], sizes[1:]
            if current["layer"] != i:
                current["tensors"] = {}  # free the previous layer first
                layer = {k: source.tensor(f"layers.{i}.{k}") for k in META_LAYER_KEYS}
                current["tensors"] = layer_to_megatron(layer, cfg, 1, names)[0]
                current["layer"] = i
                bar.update(1)
            full = current["tensors"][key[len(LAYER_PREFIX):]]
        elif key == "decoder.final_layernorm.weight":
            full = source.tensor("norm.weight")
        else:
            full = vocab_to_megatron(source.tensor(TOP_KEYS[key]), cfg, 1)[0]
        for dim, (start, size) in enumerate(zip(offsets, sizes)):
            full = full.narrow(dim, start, size)
        return full.to(want).reshape(sizes if not key.startswith(LAYER_PREFIX) else (1, *sizes))

    with staged_directory(output, force, owner="convert") as tmp, \
            tqdm(total=cfg.n_layers, unit="layer", desc="megatron", disable=not progress) as bar:
        path = iteration_dir(tmp, 0)
        os.makedirs(path)
        with _ProcessGroup():
            tconfig = to_transformer_config(cfg, ParallelLayout(), dtype=DTYPE_NAMES[dtype])
            with torch.device("meta"):  # shapes and sharding only: no weight memory
                model = build_model(cfg, tconfig)[0]
            dist_checkpointing.save({"model": model.sharded_state_dict()}, path,
                                    sharded_strategy=_StreamingSave(produce).strategy)
        with open(os.path.join(path, METADATA), "w", encoding="utf-8") as f:
            json.dump({"model": cfg.to_params_json(meta_style=False),
                       "layout": {"tp": tp, "pp": pp, "vp": None}, "dtype": DTYPE_NAMES[dtype],
                       "tokenizer": (os.path.join(os.path.abspath(output), "tokenizer.model")
                                     if source.tokenizer else None),
                       "model_only": True,
                       "files": checksum_files(path, list_files(path))}, f, indent=1)
        if source.tokenizer:
            shutil.copyfile(source.tokenizer, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, TRACKER), "w", encoding="utf-8") as f:
            f.write("0")
    return output
