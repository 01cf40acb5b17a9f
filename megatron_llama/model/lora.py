"""LoRA adapters (Hu et al. 2021) on megatron-core's tensor-parallel linears, and merging.

An adapter adds ``scale * B A x`` to a linear ``W x`` (``scale = alpha / rank``; A is
[rank, in], B is [out, rank], B starts at zero so the adapted model equals the base). It is
built from megatron-core's own parallel layers, sharded the way its base weight is:

- column-parallel bases (``linear_qkv``, ``linear_fc1``: W's output rows split over TP):
  A is replicated, B a ColumnParallelLinear (rows split like W's). B's input is gathered
  (SP) or copied (no SP) by megatron-core exactly as for W.
- row-parallel bases (``linear_proj``, ``linear_fc2``: W's input columns split): A is a
  RowParallelLinear (columns split like W's; its output all-reduced, or reduce-scattered
  over the sequence under SP), B is replicated.

A replicated factor sees a sequence shard under sequence parallelism, so its gradient is a
partial sum: it is marked ``sequence_parallel`` and megatron-core's `finalize_model_grads`
all-reduces it over TP, as it does for the norms. The initial A is drawn whole from a
generator seeded by (seed, layer, target) and sliced, so every layout starts from the same
adapters: without dropout (whose masks on sharded inputs are drawn per rank) TP=2 trains
exactly like TP=1.

The adapter of ``linear_qkv`` is registered on the attention module as ``linear_qkv_lora``
(and so on): base parameter names stay those of the checkpoint, adapter names end in
``_lora.lora_a.weight`` / ``_lora.lora_b.weight``. Checkpoint keys are megatron-core's global
shapes; fc1's B is saved in its gate/up halves like fc1 itself, so saved adapters are
independent of TP and `merge_layer` adds them to the TP=1 form of the base layer.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch

from megatron_llama.model.config import LlamaConfig

ADAPTER_MARK = "_lora."  # in every adapter parameter's name, and in no other
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")
PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
          "linear_fc1": "mlp", "linear_fc2": "mlp"}


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name


def target_sizes(tconfig, target: str) -> tuple[int, int]:
    """(in, out) features of a target linear, unsharded."""
    h, ffn = tconfig.hidden_size, tconfig.ffn_hidden_size
    q = tconfig.num_attention_heads * tconfig.kv_channels
    kv = tconfig.num_query_groups * tconfig.kv_channels
    return {"linear_qkv": (h, q + 2 * kv), "linear_proj": (q, h),
            "linear_fc1": (h, 2 * ffn), "linear_fc2": (ffn, h)}[target]


def initial_a(seed: int, layer: int, target: str, rank: int, in_features: int) -> torch.Tensor:
    """The whole initial A [rank, in] of one adapter: Kaiming-uniform (a = sqrt(5)), as
    torch initialises a Linear, from a generator seeded by (seed, global layer, target)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 101 + zlib.crc32(target.encode()))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
    return (torch.rand(rank, in_features, generator=g) * 2 - 1) * bound


def _module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class LoraAdapter(_module_base()):
    """``scale * B A x`` for one target linear of one layer (see the module doc)."""

    def __init__(self, tconfig, target: str, layer: int, rank: int, alpha: float,
                 dropout: float, seed: int = 0, norm_weight: Optional[torch.Tensor] = None):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=tconfig)
        self.target, self.scale, self.dropout = target, alpha / rank, dropout
        self.column = target in COLUMN_TARGETS
        # Transformer Engine fuses the pre-norm into linear_qkv / linear_fc1: the adapter
        # sees the un-normed input and norms it with the same weight.
        # a reference, not a parameter of the adapter: it stays the base's (frozen, saved
        # with the base, never in an adapter checkpoint)
        object.__setattr__(self, "norm_weight", norm_weight)
        self.norm_eps = tconfig.layernorm_epsilon
        in_f, out_f = target_sizes(tconfig, target)
        dtype = tconfig.params_dtype
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        a_full = initial_a(seed, layer, target, rank, in_f)
        zero = torch.nn.init.zeros_
        if self.column:
            self.lora_a = torch.nn.Linear(in_f, rank, bias=False, dtype=dtype)
            self.lora_b = ColumnParallelLinear(rank, out_f, config=tconfig, init_method=zero,
                                               bias=False, gather_output=False,
                                               skip_bias_add=True)
            replicated = self.lora_a.weight
            with torch.no_grad():
                self.lora_a.weight.copy_(a_full)
        else:
            self.lora_a = RowParallelLinear(in_f, rank, config=tconfig, init_method=zero,
                                            bias=False, input_is_parallel=True,
                                            skip_bias_add=True)
            self.lora_b = torch.nn.Linear(rank, out_f, bias=False, dtype=dtype)
            replicated = self.lora_b.weight
            with torch.no_grad():
                self.lora_a.weight.copy_(a_full.chunk(tp, dim=1)[tp_rank])
        with torch.no_grad():
            self.lora_b.weight.zero_()
        device = next(p.device for p in self.lora_b.parameters())
        self.to(device)
        if tconfig.sequence_parallel:  # a partial gradient per sequence shard: sum over TP
            replicated.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_weight is not None:
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.norm_weight, self.norm_eps)
        if self.training and self.dropout > 0:
            x = self._dropout(x)
        if self.column:
            y, _ = self.lora_b(self.lora_a(x))
        else:
            h, _ = self.lora_a(x)
            y = self.lora_b(h)
        return y * self.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated input (column base, no SP) drops the same entries on every TP rank;
        a sharded one draws per rank, from megatron-core's model-parallel RNG."""
        from megatron.core import tensor_parallel

        if self.column and not self.config.sequence_parallel:
            return torch.nn.functional.dropout(x, self.dropout, True)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, self.dropout, True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.target == "linear_fc1":  # B's rows are [gate; up] per rank, like fc1's
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_b.weight"
            sd[key] = apply_swiglu_sharded_factory(sd[key], sharded_offsets)
        return sd


def _layers(chunk):
    model = chunk.module if hasattr(chunk, "module") else chunk
    return model.decoder.layers


def add_adapters(chunks: list, rank: int, alpha: float, dropout: float,
                 targets: tuple = COLUMN_TARGETS + ROW_TARGETS, seed: int = 0) -> int:
    """Attach adapters to every layer's ``targets`` and freeze everything else; returns the
    number of trainable (adapter) parameters on this rank."""
    for chunk in chunks:
        for layer in _layers(chunk):
            for target in targets:
                parent = getattr(layer, PARENT[target])
                base = getattr(parent, target)
                norm = getattr(base, "layer_norm_weight", None)
                adapter = LoraAdapter(layer.config, target, layer.layer_number, rank, alpha,
                                      dropout, seed, norm_weight=norm)
                setattr(parent, f"{target}_lora", adapter)
                _route(base, adapter)
    trainable = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            p.requires_grad = is_adapter(name)
            trainable += p.numel() if p.requires_grad else 0
    return trainable


def _route(base, adapter) -> None:
    """Make ``base(x)`` return ``W x + adapter(x)`` (the adapter is not a child of base, so
    base's parameter names and checkpoint keys are unchanged)."""
    original = base.forward

    def forward(x, *args, **kwargs):
        out, bias = original(x, *args, **kwargs)
        return out + adapter(x), bias

    base.forward = forward


# ---- merging: pure functions over one layer ------------------------------------------------
ADAPTER_KEYS = {t: (f"{PARENT[t]}.{t}_lora.lora_a.weight", f"{PARENT[t]}.{t}_lora.lora_b.weight")
                for t in COLUMN_TARGETS + ROW_TARGETS}


def merge_layer(meta_layer: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                cfg: LlamaConfig, scale: float) -> dict[str, torch.Tensor]:
    """One Meta layer plus its adapters -> the merged Meta layer.

    ``adapters``: megatron suffixes (``ADAPTER_KEYS``) -> full A / B tensors as saved. The base
    goes to megatron-core's TP=1 form, each target gets ``W + scale * B A`` (in fp32, then
    the base's dtype), and the layer comes back to Meta's names; layers without adapters come
    back bit-exact."""
    from megatron_llama.model.canonical import layer_to_megatron, layer_to_meta

    shard = layer_to_megatron(meta_layer, cfg, 1)[0]
    for target, (a_key, b_key) in ADAPTER_KEYS.items():
        if a_key not in adapters:
            continue
        key = f"{PARENT[target]}.{target}.weight"
        w = shard[key]
        delta = adapters[b_key].float() @ adapters[a_key].float()
        shard[key] = (w.float() + scale * delta).to(w.dtype)
    return layer_to_meta([shard], cfg)
