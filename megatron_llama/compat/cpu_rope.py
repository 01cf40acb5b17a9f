"""Rotary embeddings on CPU in one pass each way (installed by `compat.install` on CPU hosts).

megatron-core 0.16.1's unfused RoPE (what runs without CUDA's fused kernels) computes
``t * cos + cat(-t2, t1) * sin`` and a final ``cat`` with the empty pass-through part: five
full-size temporaries, two copies and a zero-filled slice gradient per call, about 5 % of a
CPU step at sequence length 2048. `rotate_halves` does the same rotation (megatron-core's
convention: pairs (i, i + d/2), see docs/megatron-core.md) straight into one output, and
`install_cpu_rope` routes ``SelfAttention``'s RoPE through it for the plain CPU cases only.
GPUs keep megatron-core's (fused) path.
"""

from __future__ import annotations

import functools

import torch


class _RotateHalves(torch.autograd.Function):
    """RoPE in megatron-core's default convention, pairs (i, i + d/2), without temporaries.

    megatron-core's unfused path computes ``t * cos + cat(-t2, t1) * sin`` and a final
    ``cat`` with the empty pass-through part: five full-size temporaries, two copies and a
    zero-filled slice gradient per call. Here: out1 = t1 cos - t2 sin, out2 = t2 cos + t1 sin,
    written into one output; the backward is the inverse rotation. Only cos and sin
    ([s, 1, 1, d/2]) are saved. Inputs: t [s, b, n, d], cos / sin broadcastable to t's halves.
    """

    @staticmethod
    def forward(ctx, t, cos, sin):
        half = t.shape[-1] // 2
        t1, t2 = t[..., :half], t[..., half:]
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        torch.addcmul(t1 * cos, t2, sin, value=-1.0, out=out[..., :half])
        torch.addcmul(t2 * cos, t1, sin, out=out[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        g1, g2 = grad[..., :half], grad[..., half:]
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        torch.addcmul(g1 * cos, g2, sin, out=out[..., :half])
        torch.addcmul(g2 * cos, g1, sin, value=-1.0, out=out[..., half:])
        return out, None, None


def rotate_halves(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """RoPE of ``t`` [s, b, n, d] with megatron-core's ``freqs`` [s, 1, 1, d] (= [f, f])."""
    half = t.shape[-1] // 2
    angles = freqs[..., :half]
    cos = (torch.cos(angles) * mscale).to(t.dtype)
    sin = (torch.sin(angles) * mscale).to(t.dtype)
    return _RotateHalves.apply(t, cos, sin)


def install_cpu_rope() -> None:
    """Route megatron-core's attention RoPE through `rotate_halves` for plain CPU cases.

    Only ``SelfAttention``'s module-level name is replaced, and the original still runs for
    anything else: CUDA tensors (fused kernels there), packed sequences, interleaved pairs,
    multi-latent attention, partial rotary dims. Idempotent.
    """
    from megatron.core.transformer import attention

    original = attention.apply_rotary_pos_emb
    if getattr(original, "_megatron_llama_cpu_rope", False):
        return

    @functools.wraps(original)
    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if (t.is_cuda or cu_seqlens is not None or config.rotary_interleaved
                or config.multi_latent_attention or config.apply_rope_fusion
                or freqs.shape[-1] != t.shape[-1]):
            return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                            cp_group=cp_group)
        return rotate_halves(t, freqs, mscale)

    apply_rotary_pos_emb._megatron_llama_cpu_rope = True
    attention.apply_rotary_pos_emb = apply_rotary_pos_emb
