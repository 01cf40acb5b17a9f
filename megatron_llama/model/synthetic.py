"""Random Meta-named weights for tests, self-checks and synthetic checkpoints."""

from __future__ import annotations

import torch

from megatron_llama.model.config import LlamaConfig


def random_meta_state_dict(cfg: LlamaConfig, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full Meta-named state dict of random weights, reproducible from ``seed``.

    Linear weights ~ N(0, 0.08^2), embeddings ~ N(0, 1), norm weights 1 + N(0, 0.1^2) (away
    from 1, so a mapping that swaps or drops a norm shows up).
    """
    g = torch.Generator().manual_seed(seed)
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_hidden_size

    def w(*shape, std=0.08):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm():
        return (1.0 + 0.1 * torch.randn(d, generator=g)).to(dtype)

    sd = {"tok_embeddings.weight": w(cfg.vocab_size, d, std=1.0), "norm.weight": norm(),
          "output.weight": w(cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        sd.update({
            p + "attention.wq.weight": w(cfg.n_heads * hd, d),
            p + "attention.wk.weight": w(cfg.num_kv_heads * hd, d),
            p + "attention.wv.weight": w(cfg.num_kv_heads * hd, d),
            p + "attention.wo.weight": w(d, cfg.n_heads * hd),
            p + "feed_forward.w1.weight": w(f, d),
            p + "feed_forward.w2.weight": w(d, f),
            p + "feed_forward.w3.weight": w(f, d),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        })
    return sd


def random_token_batches(vocab_size: int, n: int, micro_batch: int, seq_len: int,
                         seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` microbatches of next-token data: tokens [b, s] and labels shifted by one."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab_size, (n, micro_batch, seq_len + 1), generator=g)
    return [{"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()} for x in data]
