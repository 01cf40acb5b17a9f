"""The megatron-core LLaMA model in one process: counts, the paper's forward, SDPA attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_llama.model.config import to_transformer_config
from megatron_llama.model.presets import PRESETS
from megatron_llama.parallel import ParallelLayout
from tests.llama_testing import (
    TINY,
    TINY_LLAMA31,
    TINY_MHA,
    random_batches,
    random_meta_weights,
    reference_logits,
    rel_err,
    rope_frequencies,
)


def build(cfg, weights=None, attention="sdpa", dtype="fp32"):
    """A single-process model with ``weights`` (Meta names) loaded."""
    from megatron_llama.model.build import build_model, load_meta_state_dict
    from megatron_llama.parallel import initialize

    initialize(ParallelLayout(), seed=0)
    tconfig = to_transformer_config(cfg, ParallelLayout(), dtype=dtype)
    chunks = build_model(cfg, tconfig, backend="local", attention=attention)
    if weights is not None:
        load_meta_state_dict(chunks, weights, cfg)
    return chunks[0]


@pytest.fixture
def single(megatron_single):
    yield
    from megatron_llama.parallel import destroy

    destroy()


def logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions, None)  # [b, s, V]


@pytest.mark.parametrize("cfg", [PRESETS["tiny"].model, TINY], ids=["tiny-preset", "gqa"])
def test_built_model_has_counted_parameters(single, cfg):
    model = build(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


@pytest.mark.parametrize("cfg", [TINY, TINY_MHA, TINY_LLAMA31],
                         ids=["gqa", "mha-theta500", "llama3.1-scaled-rope"])
def test_logits_equal_paper_reference(single, cfg):
    weights = random_meta_weights(cfg)
    tokens = random_batches(cfg, 1, 3, 40 if cfg.use_scaled_rope else 24)[0]["tokens"]
    model = build(cfg, weights)
    with torch.no_grad():
        ours = logits(model, tokens)
    expected = reference_logits(weights, cfg, tokens)
    assert ours.shape == expected.shape
    assert rel_err(ours, expected) <= 1e-5
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_scaled_rope_frequencies_equal_independent_formula(single):
    """megatron-core's rope scaling (what the model runs) against the Llama 3 paper's rule."""
    model = build(TINY_LLAMA31)
    ours = model.rotary_pos_emb.inv_freq.double()
    expected = rope_frequencies(TINY_LLAMA31)
    unscaled = rope_frequencies(dataclasses.replace(TINY_LLAMA31, use_scaled_rope=False))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    # the tiny shape covers all three regimes: kept, interpolated, divided by the factor
    ratio = (expected / unscaled).tolist()
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / 8)
    assert any(1 / 8 + 1e-3 < r < 1 - 1e-3 for r in ratio)


def test_scaled_rope_changes_logits_at_short_context(single):
    """The scaling is visible within 40 positions, so the logits test above can fail."""
    cfg = TINY_LLAMA31
    weights = random_meta_weights(cfg)
    tokens = random_batches(cfg, 1, 2, 40)[0]["tokens"]
    unscaled = dataclasses.replace(cfg, use_scaled_rope=False)
    gap = rel_err(reference_logits(weights, cfg, tokens), reference_logits(weights, unscaled, tokens))
    assert gap > 1e-4  # 20x the 1e-5 tolerance of the logits test


def test_sdpa_attention_equals_megatron_attention(single):
    weights = random_meta_weights(TINY)
    batch = random_batches(TINY, 1, 2, 32)[0]
    positions = torch.arange(32).expand(2, 32)
    results = {}
    for attention in ("sdpa", "megatron"):
        model = build(TINY, weights, attention=attention)
        loss = model(batch["tokens"], positions, None, labels=batch["labels"]).mean()
        loss.backward()
        results[attention] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        from megatron_llama.parallel import destroy
        destroy()
    (l1, g1), (l2, g2) = results["sdpa"], results["megatron"]
    assert abs(l1.item() - l2.item()) <= 1e-6 * abs(l2.item())
    for name in g2:
        assert rel_err(g1[name], g2[name]) <= 1e-5, name


def test_bf16_model_close_to_fp32_reference(single):
    weights = random_meta_weights(TINY_MHA)
    tokens = random_batches(TINY_MHA, 1, 1, 16)[0]["tokens"]
    model = build(TINY_MHA, {k: v.bfloat16() for k, v in weights.items()}, dtype="bf16")
    assert model.output_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours = logits(model, tokens).float()
    assert rel_err(ours, reference_logits(weights, TINY_MHA, tokens)) < 3e-2
