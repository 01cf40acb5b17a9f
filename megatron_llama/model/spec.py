"""LLaMA's transformer layer as a megatron-core ModuleSpec, with kernel detection.

`get_llama_block_spec` picks, per host:
- ``te``: Transformer Engine (fused RMSNorm+linear, TE flash attention) when TE imports;
- ``local``: megatron-core's tensor-parallel linears with our `RMSNorm` (apex's fused
  kernel when apex imports) and `SDPAttention` (PyTorch's fused causal attention).
The block spec also names the final RMSNorm, so it is sequence-parallel aware too.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    """True when Transformer Engine and megatron-core's TE extension import."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import megatron.core.extensions.transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE install must not break the CPU path
        return False
    return True


def detect_backends() -> dict[str, str]:
    """What this host offers: device, distributed backend, kernels. Values are short strings."""
    from megatron_llama.model.layers import apex_rms_norm

    cuda = torch.cuda.is_available()
    info = {
        "device": (f"CUDA ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
                   if cuda else f"CPU ({torch.get_num_threads()} threads)"),
        "distributed backend": "nccl" if cuda else "gloo (CPU adapter active)",
        "transformer engine": "yes" if transformer_engine_available() else "no",
        "apex fused RMSNorm": "yes" if apex_rms_norm() is not None else "no",
    }
    if cuda:
        flash = torch.backends.cuda.flash_sdp_enabled()
        info["attention"] = ("TE fused attention" if transformer_engine_available()
                             else f"torch SDPA (flash kernel {'on' if flash else 'off'})")
    else:
        info["attention"] = "torch SDPA (CPU fused kernel)"
    info["layer spec"] = default_layer_backend()
    info["torch"] = torch.__version__
    try:
        from importlib.metadata import version
        info["megatron-core"] = version("megatron-core")
    except Exception:  # noqa: BLE001
        info["megatron-core"] = "not installed"
    return info


def default_layer_backend() -> str:
    """The layer spec this host gets: ``te`` when Transformer Engine imports, else ``local``."""
    return "te" if transformer_engine_available() else "local"


def get_llama_layer_spec(backend: Optional[str] = None, attention: str = "sdpa"):
    """One LLaMA layer: pre-norm attention + pre-norm SwiGLU MLP, residuals, no biases.

    ``attention="megatron"`` swaps in megatron-core's own ``DotProductAttention`` (local
    backend only); the tests use it to show that `SDPAttention` computes the same thing.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import (
        SelfAttention,
        SelfAttentionSubmodules,
    )
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    backend = backend or default_layer_backend()
    if backend == "te":
        # TE reads normalization="RMSNorm" from the config and fuses it into the next linear.
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        return get_gpt_layer_with_transformer_engine_spec()
    if backend != "local":
        raise ValueError(f"unknown layer backend {backend!r} (te or local)")

    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
    )
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_llama.model.layers import RMSNorm, SDPAttention

    core_attention = {"sdpa": SDPAttention, "megatron": DotProductAttention}[attention]
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,  # rows grouped per query group
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,  # [w1; w3] per rank
                                         linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_llama_block_spec(config, backend: Optional[str] = None, attention: str = "sdpa",
                         vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """The decoder block for this pipeline stage: its layers plus the final RMSNorm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    backend = backend or default_layer_backend()
    layer = get_llama_layer_spec(backend, attention)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        final_norm = TENorm
    else:
        from megatron_llama.model.layers import RMSNorm
        final_norm = RMSNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)
