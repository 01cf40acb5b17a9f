"""Build megatron-core GPTModel chunks for LLaMA on this rank.

The model definition is megatron-core's GPTModel with LLaMA's layer spec (`spec.py`); the
parallel layout comes from the process groups set up by `parallel.initialize` (which also
applies `megatron_llama.compat`). With virtual
pipeline stages a rank holds several chunks, so `build_model` always returns a list.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_llama.model.config import LlamaConfig


def build_model(cfg: LlamaConfig, tconfig, *, backend: Optional[str] = None,
                attention: str = "sdpa") -> list:
    """GPTModel chunk(s) of ``cfg`` for this pipeline rank, one per virtual stage.

    ``tconfig`` is the `TransformerConfig` from `model.config.to_transformer_config` (it carries the
    layout). Weights are initialised by megatron-core (normal, std 0.02) from the seeded RNGs.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_llama.model.spec import get_llama_block_spec

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    vp_size = tconfig.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        stage = vp_stage if vp_size else None
        model = GPTModel(
            config=tconfig,
            transformer_layer_spec=get_llama_block_spec(tconfig, backend, attention,
                                                        vp_stage=stage, pp_rank=pp_rank),
            vocab_size=cfg.padded_vocab_size(tconfig.tensor_model_parallel_size),
            max_sequence_length=cfg.max_seq_len,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=int(cfg.rope_theta),
            # Llama 3.1: megatron-core's own scaling is Meta's, with low/high frequency
            # factors 1/4 and an original context of 8192 fixed as in Meta's code.
            rope_scaling=cfg.use_scaled_rope,
            rope_scaling_factor=cfg.rope_scaling_factor,
            vp_stage=stage,
        )
        chunks.append(model)
    return chunks


def _chunk_key(vp_stage: int):
    from megatron.core import parallel_state

    return (parallel_state.get_pipeline_model_parallel_rank(), vp_stage,
            parallel_state.get_tensor_model_parallel_rank())


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def load_meta_state_dict(chunks: list, meta: dict, cfg: LlamaConfig, names: str = "local") -> None:
    """Copy full Meta-named weights into this rank's chunks (its TP/PP/VP slice)."""
    load_weights(chunks, cfg, meta.__getitem__, names)


def layer_names(chunk) -> str:
    """'te' when the chunk's norms are fused into Transformer Engine linears, else 'local'."""
    return "te" if any(n.endswith("linear_qkv.layer_norm_weight")
                       for n, _ in _unwrap(chunk).named_parameters()) else "local"


def load_weights(chunks: list, cfg: LlamaConfig, tensor, names: Optional[str] = None) -> None:
    """Copy weights into this rank's chunks from ``tensor(meta_name) -> full tensor`` (a
    checkpoint reader's `tensor`, or a dict's ``__getitem__``), reading only what this rank
    holds: its chunks' layers, the embedding on the first stage, norm and output on the last;
    one layer in memory at a time. Every parameter of the chunks must receive a value."""
    from megatron.core import parallel_state

    from megatron_llama.model.canonical import (
        META_LAYER_KEYS,
        chunk_layer_counts,
        chunk_layers,
        layer_to_megatron,
        vocab_to_megatron,
    )

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    tconfig = _unwrap(chunks[0]).config  # uneven stages are recorded there
    names = names or layer_names(chunks[0])
    counts = chunk_layer_counts(cfg.n_layers, pp, vp, tconfig.num_layers_in_first_pipeline_stage,
                                tconfig.num_layers_in_last_pipeline_stage,
                                tconfig.account_for_embedding_in_pipeline_split)
    layers = chunk_layers(cfg.n_layers, pp, vp, counts)
    last = (pp - 1, (vp or 1) - 1)
    for s, chunk in enumerate(chunks):
        model = _unwrap(chunk)
        targets = dict(model.named_parameters())
        filled: set[str] = set()

        def put(name: str, value) -> None:
            if name not in targets:
                raise RuntimeError(f"weight mapping mismatch: no parameter {name}")
            if tuple(targets[name].shape) != tuple(value.shape):
                raise RuntimeError(f"weight mapping mismatch: {name} is "
                                   f"{tuple(targets[name].shape)}, got {tuple(value.shape)}")
            with torch.no_grad():
                targets[name].copy_(value)
            filled.add(name)

        if (pp_rank, s) == (0, 0):
            put("embedding.word_embeddings.weight",
                vocab_to_megatron(tensor("tok_embeddings.weight"), cfg, tp)[tp_rank])
        for j, i in enumerate(layers[(pp_rank, s)]):
            layer = {k: tensor(f"layers.{i}.{k}") for k in META_LAYER_KEYS}
            for k, t in layer_to_megatron(layer, cfg, tp, names)[tp_rank].items():
                put(f"decoder.layers.{j}.{k}", t)
        if (pp_rank, s) == last:
            put("decoder.final_layernorm.weight", tensor("norm.weight"))
            put("output_layer.weight", vocab_to_megatron(tensor("output.weight"), cfg, tp)[tp_rank])
        missing = sorted(set(n for n in targets if "_lora" not in n) - filled)
        if missing:
            raise RuntimeError(f"weight mapping mismatch: no value for {missing}")


def local_shards(chunks: list, grads: bool = False) -> dict:
    """This rank's tensors keyed by (pp_rank, vp_stage, tp_rank) -> {megatron name: tensor}.

    With ``grads=True`` the finalised gradients (DDP's ``main_grad``) instead of the weights.
    """
    out = {}
    for s, chunk in enumerate(chunks):
        tensors = {}
        for name, param in _unwrap(chunk).named_parameters():
            if grads:
                g = getattr(param, "main_grad", None)
                tensors[name] = (g if g is not None else param.grad).detach().clone()
            else:
                tensors[name] = param.detach().clone()
        out[_chunk_key(s)] = tensors
    return out
