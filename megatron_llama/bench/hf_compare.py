"""The usual alternative on one machine: Hugging Face transformers' `LlamaForCausalLM`.

`HFTrainer` trains the same shapes as our benchmark the way a user of transformers would:
``LlamaForCausalLM`` (fp32, SDPA attention, untied output), ``torch.optim.AdamW`` with the
paper's betas, eps and weight decay and torch's default implementation for CPU tensors,
gradient clipping at 1.0, ``model(input_ids, labels=...)`` for the loss (it shifts the labels
itself, so it scores s-1 positions per sequence; the FLOPs are the same). No tricks on either
side: this is the comparison a user would make.
"""

from __future__ import annotations

import time

from megatron_llama.errors import require
from megatron_llama.model.config import LlamaConfig


class HFTrainer:
    """One transformers LLaMA + AdamW; `step(tokens)` runs one timed training step."""

    def __init__(self, cfg: LlamaConfig, seq_length: int, lr: float = 3e-4, seed: int = 0):
        transformers = require("transformers", "--compare-hf")
        import torch

        torch.manual_seed(seed)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
            intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=max(seq_length, cfg.max_seq_len), rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, torch_dtype="float32", use_cache=False)
        self.model = transformers.LlamaForCausalLM._from_config(
            hf_cfg, attn_implementation="sdpa", torch_dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                           eps=1e-8, weight_decay=0.1)
        self.version = transformers.__version__
        n = sum(p.numel() for p in self.model.parameters())
        if n != cfg.num_params():
            raise RuntimeError(f"transformers model has {n:,} parameters, ours {cfg.num_params():,}")

    def step(self, tokens) -> tuple[float, float]:
        """One training step on ``tokens`` [b, s]; returns (seconds, loss)."""
        import torch

        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return time.perf_counter() - start, float(loss)
