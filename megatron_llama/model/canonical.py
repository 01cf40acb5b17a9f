"""Pure weight mappings between Meta's LLaMA names and megatron-core's sharded GPTModel.

The canonical form is Meta's: full (unsharded) tensors under Meta's names
(``layers.{i}.attention.wq.weight`` ...). Everything here is state dict in, state dict out:
no I/O, no process groups, so every mapping is tested on its own and reused by the
converters, the tests' weight loading and the Megatron checkpoint reader/writer.

Layouts (docs/megatron-core.md and docs/checkpoint-formats.md, "RoPE conventions"):
- RoPE: Meta rotates adjacent pairs (2i, 2i+1); megatron-core rotates (i, i + hd/2). The
  rows of wq and wk are permuted inside each head (even rows first, then odd rows).
- linear_qkv rows are grouped per query group g: [q heads of g, k_g, v_g]; TP splits groups.
- linear_fc1 on TP rank r is [w1 shard r; w3 shard r] (gate, then up).
- wo / w2 (linear_proj / linear_fc2) are split along their input dim (dim 1).
- Embedding and output rows are padded to the padded vocabulary, then split along dim 0.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from megatron_llama.model.config import LlamaConfig

Shard = tuple[int, int, int]  # (pp_rank, vp_stage, tp_rank); vp_stage is 0 without VP

# Meta per-layer suffixes -> megatron local-spec suffixes (after "decoder.layers.{j}.").
LAYER_NORM_NAMES = {
    "local": {"attention_norm.weight": "input_layernorm.weight",
              "ffn_norm.weight": "pre_mlp_layernorm.weight"},
    "te": {"attention_norm.weight": "self_attention.linear_qkv.layer_norm_weight",
           "ffn_norm.weight": "mlp.linear_fc1.layer_norm_weight"},
}
META_LAYER_KEYS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                   "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")
META_TOP_KEYS = ("tok_embeddings.weight", "norm.weight", "output.weight")


def meta_keys(cfg: LlamaConfig) -> list[str]:
    """Every parameter name of a full Meta checkpoint for ``cfg``."""
    keys = list(META_TOP_KEYS)
    for i in range(cfg.n_layers):
        keys += [f"layers.{i}.{k}" for k in META_LAYER_KEYS]
    return keys


# ---- Meta's shapes and model-parallel split ------------------------------------------------
# Dimension along which Meta splits each tensor across model-parallel shards (None: copied).
SPLIT_DIM = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None,
             "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
             "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
             "feed_forward.w2.weight": 1, "attention_norm.weight": None, "ffn_norm.weight": None}


def _suffix(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def layer_index(name: str) -> Optional[int]:
    """``3`` for ``layers.3.attention.wq.weight``; None for the embedding, norm and output."""
    return int(name.split(".", 2)[1]) if name.startswith("layers.") else None


def split_dim(name: str, embedding_dim: int = 1) -> Optional[int]:
    """Meta's split dimension for a full key like ``layers.3.attention.wq.weight``.

    ``embedding_dim``: LLaMA-1/2 and Code Llama split ``tok_embeddings`` by columns (1); Llama
    3.x's files split it by vocabulary rows (0), a vocab-parallel embedding.
    """
    if name == "tok_embeddings.weight":
        return embedding_dim
    return SPLIT_DIM[_suffix(name)]


def full_shape(name: str, cfg: LlamaConfig) -> tuple[int, ...]:
    """Unsharded shape of a Meta tensor for ``cfg``."""
    d, hd, f, v = cfg.dim, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    return {"tok_embeddings.weight": (v, d), "output.weight": (v, d), "norm.weight": (d,),
            "attention.wq.weight": (cfg.n_heads * hd, d),
            "attention.wk.weight": (cfg.num_kv_heads * hd, d),
            "attention.wv.weight": (cfg.num_kv_heads * hd, d),
            "attention.wo.weight": (d, cfg.n_heads * hd),
            "feed_forward.w1.weight": (f, d), "feed_forward.w3.weight": (f, d),
            "feed_forward.w2.weight": (d, f),
            "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}[_suffix(name)]


def shape_mismatch(source: LlamaConfig, wanted: LlamaConfig) -> list[str]:
    """'name: checkpoint [a, b], model [c, d]' for every tensor whose shape differs."""
    out = []
    for name in meta_keys(source if source.n_layers <= wanted.n_layers else wanted):
        a, b = full_shape(name, source), full_shape(name, wanted)
        if a != b:
            out.append(f"{name}: checkpoint {list(a)}, model {list(b)}")
    if source.n_layers != wanted.n_layers:
        out.insert(0, f"n_layers: checkpoint {source.n_layers}, model {wanted.n_layers}")
    return out


def shard_shape(name: str, cfg: LlamaConfig, shards: int,
                embedding_dim: int = 1) -> tuple[int, ...]:
    """Shape of ``name`` in each of ``shards`` Meta files."""
    shape = list(full_shape(name, cfg))
    dim = split_dim(name, embedding_dim)
    if dim is not None:
        shape[dim] //= shards
    return tuple(shape)


# ---- RoPE row permutation -------------------------------------------------------------------
def rope_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> megatron-core's half-split rows, per head."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `rope_to_half_split`."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- one transformer layer ------------------------------------------------------------------
def layer_to_megatron(layer: dict[str, torch.Tensor], cfg: LlamaConfig, tp: int,
                      names: str = "local") -> list[dict[str, torch.Tensor]]:
    """One Meta layer (keys like ``attention.wq.weight``) -> one dict per TP rank.

    Output keys are megatron suffixes under ``decoder.layers.{j}.``. Tensors are contiguous
    copies, independent of the input.
    """
    ng, hd, d = cfg.num_kv_heads, cfg.head_dim, cfg.dim
    q = rope_to_half_split(layer["attention.wq.weight"], cfg.n_heads)
    k = rope_to_half_split(layer["attention.wk.weight"], ng)
    v = layer["attention.wv.weight"]
    # [ng, (heads_per_group + 2) * hd, d]: each group's q heads, then its k, then its v.
    qkv = torch.cat([q.reshape(ng, -1, d), k.reshape(ng, hd, d), v.reshape(ng, hd, d)], dim=1)
    qkv_shards = qkv.reshape(-1, d).chunk(tp, dim=0)
    w1 = layer["feed_forward.w1.weight"].chunk(tp, dim=0)
    w3 = layer["feed_forward.w3.weight"].chunk(tp, dim=0)
    wo = layer["attention.wo.weight"].chunk(tp, dim=1)
    w2 = layer["feed_forward.w2.weight"].chunk(tp, dim=1)
    norms = LAYER_NORM_NAMES[names]
    out = []
    for r in range(tp):
        shard = {
            "self_attention.linear_qkv.weight": qkv_shards[r].clone(),
            "self_attention.linear_proj.weight": wo[r].contiguous().clone(),
            "mlp.linear_fc1.weight": torch.cat([w1[r], w3[r]], dim=0),
            "mlp.linear_fc2.weight": w2[r].contiguous().clone(),
        }
        for meta_name, mcore_name in norms.items():
            shard[mcore_name] = layer[meta_name].clone()
        out.append(shard)
    return out


def layer_to_meta(shards: list[dict[str, torch.Tensor]], cfg: LlamaConfig,
                  names: str = "local") -> dict[str, torch.Tensor]:
    """Inverse of `layer_to_megatron`: TP shards of one layer -> Meta's full tensors."""
    ng, hd, d = cfg.num_kv_heads, cfg.head_dim, cfg.dim
    qkv = torch.cat([s["self_attention.linear_qkv.weight"] for s in shards], dim=0)
    qkv = qkv.reshape(ng, -1, d)
    q_rows = qkv.shape[1] - 2 * hd
    q, k, v = qkv.split([q_rows, hd, hd], dim=1)
    fc1 = [s["mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards]
    out = {
        "attention.wq.weight": rope_to_interleaved(q.reshape(-1, d), cfg.n_heads),
        "attention.wk.weight": rope_to_interleaved(k.reshape(-1, d), ng),
        "attention.wv.weight": v.reshape(-1, d).clone(),
        "attention.wo.weight": torch.cat([s["self_attention.linear_proj.weight"] for s in shards], 1),
        "feed_forward.w1.weight": torch.cat([g for g, _ in fc1], dim=0),
        "feed_forward.w3.weight": torch.cat([u for _, u in fc1], dim=0),
        "feed_forward.w2.weight": torch.cat([s["mlp.linear_fc2.weight"] for s in shards], dim=1),
    }
    for meta_name, mcore_name in LAYER_NORM_NAMES[names].items():
        out[meta_name] = shards[0][mcore_name].clone()
    return out


# ---- embeddings, final norm, output ---------------------------------------------------------
def vocab_to_megatron(w: torch.Tensor, cfg: LlamaConfig, tp: int) -> list[torch.Tensor]:
    """[V, D] -> TP shards of [Vp/TP, D]; padded rows are zero."""
    padded = cfg.padded_vocab_size(tp)
    if padded > w.shape[0]:
        w = torch.cat([w, w.new_zeros(padded - w.shape[0], w.shape[1])], dim=0)
    return [s.clone() for s in w.chunk(tp, dim=0)]


def vocab_to_meta(shards: list[torch.Tensor], cfg: LlamaConfig) -> torch.Tensor:
    """TP shards of [Vp/TP, D] -> [V, D], padded rows dropped."""
    return torch.cat(shards, dim=0)[: cfg.vocab_size].clone()


# ---- pipeline placement ---------------------------------------------------------------------
def stage_layer_counts(n_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> list[int]:
    """Transformer layers on each pipeline stage: ``first`` / ``last`` where given (megatron-
    core's uneven pipeline), the remaining layers split evenly over the other stages."""
    middle_stages = pp - (first is not None) - (last is not None)
    middle = n_layers - (first or 0) - (last or 0)
    counts = [middle // middle_stages if middle_stages > 0 else 0] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def chunk_layer_counts(n_layers: int, pp: int, vp: Optional[int] = None,
                       first: Optional[int] = None, last: Optional[int] = None,
                       ends_as_layers: bool = False) -> dict[tuple[int, int], int]:
    """Transformer layers in each (pp_rank, vp_stage) chunk, as megatron-core builds them.

    Even by default; ``first`` / ``last``: uneven first and last stages (each split over its
    V chunks); ``ends_as_layers``: the embedding and the loss count as one layer each
    (megatron-core's account_for_embedding/loss_in_pipeline_split), so the first chunk of
    stage 0 and the last chunk of the last stage hold one transformer layer less.
    """
    v = vp or 1
    if ends_as_layers:
        per = (n_layers + 2) // (pp * v)
        counts = {(p, s): per for p in range(pp) for s in range(v)}
        counts[(0, 0)] -= 1
        counts[(pp - 1, v - 1)] -= 1
        return counts
    stages = stage_layer_counts(n_layers, pp, first, last)
    return {(p, s): stages[p] // v for p in range(pp) for s in range(v)}


def chunk_layers(n_layers: int, pp: int, vp: Optional[int] = None,
                 counts: Optional[dict[tuple[int, int], int]] = None
                 ) -> dict[tuple[int, int], range]:
    """Global layer indices of each (pp_rank, vp_stage) model chunk, as megatron-core places them.

    Layers are dealt out in virtual passes: pass v visits stages 0 .. P-1, each taking its
    chunk's count (`chunk_layer_counts`; default L / (P V) each). So with 8 layers, PP=2,
    VP=2, rank 0 holds 0-1 and 4-5. Megatron numbers layers from 0 inside every chunk.
    """
    v = vp or 1
    counts = counts or chunk_layer_counts(n_layers, pp, vp)
    out: dict[tuple[int, int], range] = {}
    start = 0
    for s in range(v):
        for p in range(pp):
            out[(p, s)] = range(start, start + counts[(p, s)])
            start += counts[(p, s)]
    return out


def meta_to_megatron(meta: dict[str, torch.Tensor], cfg: LlamaConfig, tp: int = 1, pp: int = 1,
                     vp: Optional[int] = None, names: str = "local",
                     counts: Optional[dict[tuple[int, int], int]] = None
                     ) -> Iterator[tuple[Shard, dict[str, torch.Tensor]]]:
    """Full Meta state dict -> ((pp_rank, vp_stage, tp_rank), megatron state dict) per chunk.

    Keys ending in ``rope.freqs`` (buffers in Meta's files, not parameters) are ignored.
    ``counts``: layers per chunk when uneven (`chunk_layer_counts`).
    """
    chunks = chunk_layers(cfg.n_layers, pp, vp, counts)
    last_stage = (pp - 1, (vp or 1) - 1)
    emb = vocab_to_megatron(meta["tok_embeddings.weight"], cfg, tp)
    outp = vocab_to_megatron(meta["output.weight"], cfg, tp)
    for (p, s), layers in chunks.items():
        per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for j, i in enumerate(layers):
            layer = {k: meta[f"layers.{i}.{k}"] for k in META_LAYER_KEYS}
            for r, shard in enumerate(layer_to_megatron(layer, cfg, tp, names)):
                per_tp[r].update({f"decoder.layers.{j}.{k}": t for k, t in shard.items()})
        for r in range(tp):
            if (p, s) == (0, 0):
                per_tp[r]["embedding.word_embeddings.weight"] = emb[r]
            if (p, s) == last_stage:
                per_tp[r]["decoder.final_layernorm.weight"] = meta["norm.weight"].clone()
                per_tp[r]["output_layer.weight"] = outp[r]
            yield (p, s, r), per_tp[r]


def megatron_to_meta(shards: dict[Shard, dict[str, torch.Tensor]], cfg: LlamaConfig,
                     tp: int = 1, pp: int = 1, vp: Optional[int] = None,
                     names: str = "local",
                     counts: Optional[dict[tuple[int, int], int]] = None
                     ) -> dict[str, torch.Tensor]:
    """Inverse of `meta_to_megatron`: every chunk's state dict -> full Meta state dict.

    Keys megatron adds that are not weights (``_extra_state``, rotary buffers) are ignored.
    """
    chunks = chunk_layers(cfg.n_layers, pp, vp, counts)
    last = (pp - 1, (vp or 1) - 1)
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": vocab_to_meta(
            [shards[(0, 0, r)]["embedding.word_embeddings.weight"] for r in range(tp)], cfg),
        "norm.weight": shards[(*last, 0)]["decoder.final_layernorm.weight"].clone(),
        "output.weight": vocab_to_meta(
            [shards[(*last, r)]["output_layer.weight"] for r in range(tp)], cfg),
    }
    for (p, s), layers in chunks.items():
        for j, i in enumerate(layers):
            prefix = f"decoder.layers.{j}."
            per_tp = [{k[len(prefix):]: t for k, t in shards[(p, s, r)].items()
                       if k.startswith(prefix)} for r in range(tp)]
            for k, t in layer_to_meta(per_tp, cfg, names).items():
                out[f"layers.{i}.{k}"] = t
    return out
