"""Measure what the CPU platform adapter costs per training step.

Runs forward-backward steps of a small LLaMA on one CPU process under cProfile and reports
the share of time spent inside megatron_llama/compat/cpu_adapter.py (the torch proxy's factories,
``torch.cuda`` stand-ins and RNG hooks), next to the plain wall time per step.

    python tools/adapter_overhead.py [--steps 20] [--dim 256] [--layers 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--dim", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    args = parser.parse_args()

    import torch

    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import LlamaConfig, to_transformer_config
    from megatron_llama.parallel import ParallelLayout, init_distributed, initialize
    from megatron_llama.training.engines.megatron_core import forward_backward, wrap_ddp

    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                      vocab_size=8192, multiple_of=32, max_seq_len=args.seq)
    init_distributed()
    initialize(ParallelLayout())
    tconfig = to_transformer_config(cfg, ParallelLayout())
    chunks = wrap_ddp(build_model(cfg, tconfig), tconfig)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = [{"tokens": data[:, :-1], "labels": data[:, 1:]}]

    def step():
        for c in chunks:
            c.zero_grad_buffer()
        forward_backward(chunks, tconfig, batch, seq_length=args.seq, micro_batch_size=args.batch)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - start) / args.steps

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    adapter = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.stats.items()
                  if path.endswith(os.path.join("megatron_llama", "compat", "cpu_adapter.py")))
    calls = sum(nc for (path, _, _), (_, nc, _, _, _) in stats.stats.items()
                if path.endswith(os.path.join("megatron_llama", "compat", "cpu_adapter.py")))
    print(f"model: dim {args.dim}, {args.layers} layers, seq {args.seq}, batch {args.batch}")
    print(f"step time (no profiler): {wall * 1e3:.1f} ms")
    print(f"adapter: {calls / args.steps:.0f} calls/step, "
          f"{adapter / args.steps * 1e3:.3f} ms/step = {100 * adapter / total:.3f}% of profiled time")


if __name__ == "__main__":
    main()
