"""LoRA adapters in one process: the adapted model starts equal to the base exactly, only
adapters train, their count is exact, and merged weights give the adapted model's logits.
(TP=2 + SP and PP=2 against one process, resume and the merge from a checkpoint:
test_finetune.py.)"""

from __future__ import annotations

import torch

from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights, reference_logits, rel_err

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                  max_seq_len=32)


def logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., :CFG.vocab_size].float()


def test_lora_starts_at_the_base_and_merges(megatron_single):
    from megatron_llama.finetune.recipe import LoraSettings
    from megatron_llama.finetune.run import lora_parameter_count
    from megatron_llama.model.build import build_model, load_meta_state_dict
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.model.lora import ADAPTER_KEYS, add_adapters, is_adapter, merge_layer
    from megatron_llama.parallel import ParallelLayout, destroy, initialize

    weights = random_meta_weights(CFG, seed=5)
    tokens = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    initialize(ParallelLayout(), seed=0)
    try:
        model = build_model(CFG, to_transformer_config(CFG, ParallelLayout()))[0]
        load_meta_state_dict([model], weights, CFG)
        model.eval()
        base = logits(model, tokens)
        trainable = add_adapters([model], rank=4, alpha=8.0, dropout=0.1, seed=0)
        model.eval()  # the new adapters too (no dropout)
        assert torch.equal(logits(model, tokens), base)  # B = 0: exactly the base
        lora = LoraSettings(rank=4, alpha=8.0)
        assert trainable == lora_parameter_count(CFG, lora) == 2 * 4 * (
            (64 + 128) + (64 + 64) + (64 + 2 * 176) + (176 + 64))
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(not is_adapter(n) for n in frozen)
        assert all(p.requires_grad == is_adapter(n) for n, p in model.named_parameters())
        # trained adapters: B no longer zero
        g = torch.Generator().manual_seed(1)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                if n.endswith("lora_b.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapted = logits(model, tokens)
        assert rel_err(adapted, base) > 1e-3
        merged = dict(weights)
        for i in range(CFG.n_layers):
            adapters = {k: params[f"decoder.layers.{i}.{k}"].detach()
                        for pair in ADAPTER_KEYS.values() for k in pair}
            layer = {k.split(".", 2)[2]: v for k, v in weights.items()
                     if k.startswith(f"layers.{i}.")}
            merged.update({f"layers.{i}.{k}": v
                           for k, v in merge_layer(layer, adapters, CFG, scale=2.0).items()})
            # a layer without adapters comes back bit-exact
            same = merge_layer(layer, {}, CFG, scale=2.0)
            assert all(torch.equal(same[k], layer[k]) for k in layer)
        assert rel_err(reference_logits(merged, CFG, tokens), adapted) <= 1e-5
    finally:
        destroy()
