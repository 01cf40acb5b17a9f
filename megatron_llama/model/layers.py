"""Torch-native LLaMA layers for megatron-core's local (non Transformer Engine) spec.

- `RMSNorm`: LLaMA's pre-normalisation. Its weight carries ``sequence_parallel`` so that
  under sequence parallelism megatron-core's ``finalize_model_grads`` all-reduces its
  gradient over the tensor-parallel group (each rank only saw its slice of the sequence).
  Uses apex's fused kernel when apex is installed and the input is on a GPU.
- `SDPAttention`: causal core attention through ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels on GPU, fused kernel on CPU): the [s, s] attention
  matrix is never stored, as in the paper's efficient attention (section 2.4).

Rotary embeddings are megatron-core's own (`compat.cpu_rope` replaces its unfused CPU path).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


@functools.lru_cache(maxsize=None)
def apex_rms_norm():
    """apex's fused RMSNorm function, or None when apex is not installed."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 as LLaMA does."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6,
                 **unused):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device=_param_device(config)))
        # finalize_model_grads all-reduces grads of params marked like this over TP under SP.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = apex_rms_norm()
        if fused is not None and x.is_cuda:
            return fused(x, self.weight, (self.hidden_size,), self.eps)
        normed = F.rms_norm(x.float(), (self.hidden_size,), eps=self.eps).type_as(x)
        return normed * self.weight


def _param_device(config: TransformerConfig):
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` using PyTorch SDPA.

    Inputs are megatron's [s, b, heads, head_dim] query and [s, b, groups, head_dim] key/value
    (grouped-query attention is handled by SDPA's ``enable_gqa``); the output is
    [s, b, heads * head_dim] for this tensor-parallel rank.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use TE")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal
        mask = None
        if attention_mask is not None:
            # an explicit mask (packed fine-tuning rows: block-diagonal and causal) replaces
            # the plain causal one; megatron: True = masked out, SDPA: True = attend
            mask, causal = ~attention_mask, False
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                     is_causal=causal, scale=self.softmax_scale,
                                                     enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        # [b, n, s, d] -> [s, b, n * d]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}  # no parameters
