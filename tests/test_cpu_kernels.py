"""CPU fast paths against megatron-core's own implementations (forward and backward)."""

from __future__ import annotations

import torch


def test_rotate_halves_matches_megatron_rope():
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
    )
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding,
    )

    from megatron_llama import compat
    from megatron_llama.compat.cpu_rope import rotate_halves

    compat.install()  # RotaryEmbedding asks torch.cuda for its device
    torch.manual_seed(0)
    s, b, n, d = 12, 2, 3, 16
    freqs = RotaryEmbedding(d, rotary_percent=1.0, rotary_base=500, use_cpu_initialization=True)(s)
    # a strided view, as megatron's q/k are (split out of the fused QKV output)
    qkv = torch.randn(s, b, n, 3 * d, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(s, b, n, d, dtype=torch.float64)
    outs = []
    for fn in (lambda t: _apply_rotary_pos_emb_bshd(t, freqs.double()),
               lambda t: rotate_halves(t, freqs.double())):
        qkv.grad = None
        out = fn(qkv[..., d:2 * d])
        out.backward(grad)
        outs.append((out.detach(), qkv.grad.clone()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-12, atol=1e-12)


def test_fused_adamw_on_cpu_matches_the_loop():
    """The fused CPU AdamW switch (`compat.optimizer.use_fused_cpu_adamw`): the same update."""
    from megatron_llama.compat.optimizer import use_fused_cpu_adamw

    class Holder:  # shaped like megatron-core's optimizer wrapper: `.optimizer`
        def __init__(self, opt):
            self.optimizer = opt

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, 5)) for _ in range(2)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loop = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    fused = torch.optim.AdamW(clones, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert use_fused_cpu_adamw(Holder(fused)) == 1
    for step in range(3):
        g = [torch.randn(37, 5) for _ in params]
        for p, c, gi in zip(params, clones, g):
            p.grad, c.grad = gi.clone(), gi.clone()
        loop.step()
        fused.step()
    for p, c in zip(params, clones):
        torch.testing.assert_close(c, p, rtol=1e-5, atol=1e-6)
