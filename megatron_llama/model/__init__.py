"""The model: LlamaConfig and presets, its megatron-core mapping, layer spec, layers, GPTModel
building, and the canonical Meta naming. Knows nothing of training, data or conversion."""
