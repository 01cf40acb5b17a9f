"""`megatron-llama info`: the presets with exact parameter counts, and this host's kernels."""

from __future__ import annotations

import argparse

from megatron_llama.model.config import PRESETS


def format_presets() -> str:
    """The named presets with their exact parameter counts and paper training defaults."""
    header = (f"{'preset':<7}{'dim':>6}{'layers':>7}{'heads':>6}{'ffn':>7}{'vocab':>7}"
              f"{'parameters':>16}{'lr':>9}{'tokens':>8}{'shards':>7}")
    rows = [header, "-" * len(header)]
    for p in PRESETS.values():
        m = p.model
        tokens = f"{p.train_tokens / 1e12:.1f}T" if p.train_tokens >= 1e11 else f"{p.train_tokens / 1e6:.0f}M"
        rows.append(f"{p.name:<7}{m.dim:>6}{m.n_layers:>7}{m.n_heads:>6}{m.ffn_hidden_size:>7}"
                    f"{m.vocab_size:>7}{m.num_params():>16,}{p.lr:>9.1e}{tokens:>8}"
                    f"{p.meta_shards:>7}")
    return "\n".join(rows)


def cmd_info(args: argparse.Namespace) -> int:
    print("megatron_llama presets (parameters are exact, untied embeddings, unpadded vocab):")
    print(format_presets())
    if args.presets_only:
        return 0
    from megatron_llama.model.spec import detect_backends

    print("\ndetected on this host:")
    for key, value in detect_backends().items():
        print(f"  {key:<20} {value}")
    return 0


def add_command(subparsers) -> None:
    """Register `info`."""
    info = subparsers.add_parser(
        "info", help="presets with exact parameter counts; detected kernels",
        description="Print the named presets (paper Table 2) with exact parameter counts, and "
        "which kernels and backends this host offers (Transformer Engine, apex, SDPA/flash "
        "attention, CUDA or CPU).")
    info.add_argument("--presets-only", action="store_true",
                      help="print only the preset table (skips importing megatron-core)")
    info.set_defaults(func=cmd_info)
