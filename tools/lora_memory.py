"""Optimizer memory of a LoRA run against a full fine-tuning run of the same model.

    python tools/lora_memory.py                          # 7B widths, 2 layers (CPU-sized)
    python tools/lora_memory.py --preset tiny --layers 0 # the tiny preset as it is
    python tools/lora_memory.py --lora-rank 16

Builds the model twice in one process (megatron-core's DDP + distributed AdamW, as
`finetune` does), once fully trainable and once with adapters over a frozen base, takes one
optimizer step on a random batch so every state exists, and measures what the optimizer
holds: AdamW's two moments, fp32 main weights where the model is not fp32, and the gradient
buffers of DDP. It prints both, the ratio, and the same account for the whole preset
(every layer), where only the parameter counts change.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(cfg, lora_rank: int, seq: int, dtype: str) -> dict:
    """Bytes of optimizer states and gradient buffers after one step (LoRA when rank > 0)."""
    import torch

    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.model.lora import add_adapters
    from megatron_llama.parallel import ParallelLayout, destroy, initialize
    from megatron_llama.training.engines.megatron_core import (
        build_optimizer,
        forward_backward,
        wrap_ddp,
    )
    from megatron_llama.training.recipe import TrainConfig

    layout = ParallelLayout()
    initialize(layout, seed=0)
    try:
        tconfig = to_transformer_config(cfg, layout, dtype=dtype)
        chunks = build_model(cfg, tconfig)
        trainable = (add_adapters(chunks, lora_rank, 16.0, 0.0) if lora_rank
                     else sum(p.numel() for p in chunks[0].parameters()))
        chunks = wrap_ddp(chunks, tconfig, use_distributed_optimizer=True)
        optimizer = build_optimizer(chunks, TrainConfig(model=cfg, dtype=dtype, lr=1e-4))
        tokens = torch.randint(0, cfg.vocab_size, (1, seq))
        forward_backward(chunks, tconfig, [{"tokens": tokens, "labels": tokens}],
                         seq_length=seq, micro_batch_size=1)
        optimizer.step()
        inner = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        states = [t for o in inner for s in o.optimizer.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0]
        mains = [p for o in inner for g in getattr(o, "shard_fp32_from_float16_groups", [])
                 for p in g]
        grads = [b.grad_data for c in chunks for b in c.buffers]
        return {"trainable": trainable, "states": tensor_bytes(states),
                "main": tensor_bytes(mains), "grads": tensor_bytes(grads)}
    finally:
        destroy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="7B", help="model widths (7B)")
    p.add_argument("--layers", type=int, default=2,
                   help="layers to build (0 = the preset's own); the whole-model account "
                        "below always uses the preset's (2)")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank (8)")
    p.add_argument("--seq", type=int, default=64, help="tokens of the one step (64)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="parameter precision (fp32; bf16 adds fp32 main weights)")
    args = p.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    from megatron_llama.finetune.recipe import LoraSettings
    from megatron_llama.finetune.run import lora_parameter_count
    from megatron_llama.model.presets import get_preset
    from megatron_llama.parallel import init_distributed

    init_distributed()
    whole = get_preset(args.preset).model
    cfg = whole.replace(n_layers=args.layers) if args.layers else whole
    full = measure(cfg, 0, args.seq, args.dtype)
    lora = measure(cfg, args.lora_rank, args.seq, args.dtype)
    gib, mib = 2.0 ** 30, 2.0 ** 20
    print(f"{args.preset} widths, {cfg.n_layers} layers, {args.dtype}, LoRA rank "
          f"{args.lora_rank} on qkv/proj/fc1/fc2 (measured, one process):")
    print(f"{'':>6} {'trainable':>14} {'Adam states':>14} {'fp32 main':>12} "
          f"{'grad buffers':>14} {'total':>12}")
    for name, m in (("full", full), ("LoRA", lora)):
        total = m["states"] + m["main"] + m["grads"]
        m["total"] = total
        print(f"{name:>6} {m['trainable']:>14,} {m['states'] / mib:>10.2f} MiB "
              f"{m['main'] / mib:>8.2f} MiB {m['grads'] / mib:>10.2f} MiB "
              f"{total / mib:>8.2f} MiB")
    print(f"LoRA / full optimizer memory: {lora['total'] / full['total']:.5f} "
          f"(1 : {full['total'] / lora['total']:,.0f})")
    n_full = whole.num_params()
    n_lora = lora_parameter_count(whole, LoraSettings(rank=args.lora_rank))
    per_param = (full["states"] + full["main"] + full["grads"]) / full["trainable"]
    print(f"whole {args.preset} ({whole.n_layers} layers): {n_full:,} vs {n_lora:,} trainable "
          f"parameters, {per_param:.0f} bytes each: {n_full * per_param / gib:.1f} GiB vs "
          f"{n_lora * per_param / gib:.3f} GiB of optimizer memory (ratio "
          f"{n_lora / n_full:.5f}), before sharding over data-parallel ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
