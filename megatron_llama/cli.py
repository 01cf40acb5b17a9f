"""`megatron-llama <command>`: the single console entry point.

Each command's work is a function taking explicit arguments; this module only parses flags
and prints. Errors the user can fix (`ConfigError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from megatron_llama.config import PRESETS, ConfigError


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
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_llama.spec import detect_backends

    print("\ndetected on this host:")
    for key, value in detect_backends().items():
        print(f"  {key:<20} {value}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the spawned ranks too
    from megatron_llama import selfcheck

    return 1 if selfcheck.selfcheck(tolerance=args.tolerance) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-llama",
        description="Train LLaMA the way the paper did, on megatron-core (GPU clusters or CPU).")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    info = sub.add_parser("info", help="presets with exact parameter counts; detected kernels",
                          description="Print the named presets (paper Table 2) with exact "
                          "parameter counts, and which kernels and backends this host offers "
                          "(Transformer Engine, apex, SDPA/flash attention, CUDA or CPU).")
    info.add_argument("--presets-only", action="store_true",
                      help="print only the preset table (skips importing megatron-core)")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser(
        "selfcheck", help="prove TP/SP/PP/VP/DP and recompute match a single process",
        description="Run one forward-backward of a small LLaMA (random seeded weights) in this "
        "process and under TP=2, TP=2+SP, PP=2 (1F1B), PP=2 with interleaved virtual stages, "
        "DP=2 and activation recompute on 2 spawned local processes (gloo on CPU), then "
        "compare the loss and every gradient. Exit code 1 if any layout differs.")
    check.add_argument("--tolerance", type=float, default=1e-5,
                       help="largest accepted relative error of loss and gradients (fp32)")
    check.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"megatron-llama {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
