"""`megatron-llama info`: the presets (every LLaMA generation) with exact parameter counts, and
this host's kernels."""

from __future__ import annotations

import argparse

from megatron_llama.model.presets import PRESETS


def format_presets() -> str:
    """The named presets with their exact parameter counts and paper training defaults."""
    header = (f"{'preset':<14}{'dim':>6}{'layers':>7}{'heads':>6}{'kv':>4}{'ffn':>7}{'vocab':>8}"
              f"{'theta':>8}{'context':>8}{'parameters':>17}{'lr':>9}{'tokens':>7}{'shards':>7}")
    rows = [header, "-" * len(header)]
    for p in PRESETS.values():
        m = p.model
        tokens = f"{p.train_tokens / 1e12:.1f}T" if p.train_tokens >= 1e11 else f"{p.train_tokens / 1e6:.0f}M"
        theta = f"{m.rope_theta:.0e}".replace("e+0", "e") + ("*" if m.use_scaled_rope else "")
        rows.append(f"{p.name:<14}{m.dim:>6}{m.n_layers:>7}{m.n_heads:>6}{m.num_kv_heads:>4}"
                    f"{m.ffn_hidden_size:>7}{m.vocab_size:>8}{theta:>8}{m.max_seq_len:>8}"
                    f"{m.num_params():>17,}{p.lr:>9.1e}{tokens:>7}{p.meta_shards:>7}")
    rows.append("* Llama 3.1 RoPE scaling (factor 8); tokenizers: SentencePiece up to Llama 2 / "
                "Code Llama, tiktoken for Llama 3.x")
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
        description="Print the named presets (LLaMA-1 Table 2, Llama 2, Code Llama, Llama 3 and 3.1) "
        "with exact parameter counts, and "
        "which kernels and backends this host offers (Transformer Engine, apex, SDPA/flash "
        "attention, CUDA or CPU).")
    info.add_argument("--presets-only", action="store_true",
                      help="print only the preset table (skips importing megatron-core)")
    info.set_defaults(func=cmd_info)
