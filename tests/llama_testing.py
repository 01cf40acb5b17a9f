"""Shared test helpers: tiny configs, random Meta weights, batches, and a reference LLaMA.

`reference_logits` is written from the paper's description alone (Touvron et al. 2023,
section 2.2): pre-normalisation with RMSNorm, SwiGLU feed-forward, rotary embeddings applied
to adjacent pairs (2i, 2i+1) of each head as in Meta's release, causal attention, untied
output layer. It uses Meta's parameter names and shares no code with the package.
"""

from __future__ import annotations

import math

import torch

from megatron_llama.model.config import LlamaConfig
from megatron_llama.model.synthetic import random_meta_state_dict, random_token_batches
from megatron_llama.selfcheck import relative_error as rel_err  # noqa: F401

# Grouped-query attention (2 query heads per KV group) exercises the per-group QKV layout.
TINY = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128,
                   multiple_of=16, max_seq_len=32)
TINY_MHA = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16,
                       max_seq_len=32, rope_theta=500.0)
# Llama 3.1 in miniature: GQA, theta 500000 and scaled RoPE. With head_dim 16 its eight
# wavelengths span 6 to 6e5 positions: some kept, one interpolated, three divided by 8.
TINY_LLAMA31 = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=160,
                           multiple_of=32, ffn_dim_multiplier=1.3, max_seq_len=48,
                           rope_theta=500000.0, use_scaled_rope=True, norm_eps=1e-5)


def random_meta_weights(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    return random_meta_state_dict(cfg, seed, dtype)


def random_batches(cfg: LlamaConfig, n: int, micro_batch: int, seq_len: int, seed: int = 1):
    return random_token_batches(cfg.vocab_size, n, micro_batch, seq_len, seed)


# ---- reference forward, from the paper ------------------------------------------------------
def _rms_norm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """[hd/2] float64: theta^(-2i/hd), with Llama 3.1's long-context scaling when the config
    asks for it. Written from the Llama 3 paper's description: wavelengths (2 pi / f) shorter
    than original_context / high_factor (8192 / 4) are kept, longer than original_context /
    low_factor (8192 / 1) are divided by the factor (8), and in between the frequency is
    interpolated linearly in original_context / wavelength between f / factor and f."""
    hd = cfg.head_dim
    freqs = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if not cfg.use_scaled_rope:
        return freqs
    factor, low, high, original = cfg.rope_scaling_factor, 1.0, 4.0, 8192.0
    out = []
    for f in freqs.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            out.append(f)
        elif wavelength > original / low:
            out.append(f / factor)
        else:
            t = (original / wavelength - low) / (high - low)  # 0 at the long end, 1 at the short
            out.append((1 - t) * f / factor + t * f)
    return torch.tensor(out, dtype=torch.float64)


def _rotate_adjacent_pairs(x, inv_freq):
    """x [b, s, heads, hd]: rotate pair (2i, 2i+1) at position p by p * inv_freq[i]."""
    b, s, h, hd = x.shape
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [s, hd/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def reference_logits(weights: dict[str, torch.Tensor], cfg: LlamaConfig,
                     tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of LLaMA on ``tokens`` [b, s] with Meta-named ``weights``."""
    b, s = tokens.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.num_kv_heads
    h = weights["tok_embeddings.weight"][tokens]
    causal = torch.full((s, s), float("-inf")).triu(1)
    inv_freq = rope_frequencies(cfg)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = _rms_norm(h, weights[p + "attention_norm.weight"], cfg.norm_eps)
        q = (x @ weights[p + "attention.wq.weight"].T).view(b, s, nh, hd)
        k = (x @ weights[p + "attention.wk.weight"].T).view(b, s, nkv, hd)
        v = (x @ weights[p + "attention.wv.weight"].T).view(b, s, nkv, hd)
        q, k = _rotate_adjacent_pairs(q, inv_freq), _rotate_adjacent_pairs(k, inv_freq)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, nh * hd)
        h = h + attn @ weights[p + "attention.wo.weight"].T
        x = _rms_norm(h, weights[p + "ffn_norm.weight"], cfg.norm_eps)
        gate = torch.nn.functional.silu(x @ weights[p + "feed_forward.w1.weight"].T)
        up = x @ weights[p + "feed_forward.w3.weight"].T
        h = h + (gate * up) @ weights[p + "feed_forward.w2.weight"].T
    h = _rms_norm(h, weights["norm.weight"], cfg.norm_eps)
    return h @ weights["output.weight"].T
