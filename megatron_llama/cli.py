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
    from megatron_llama.spec import detect_backends

    print("\ndetected on this host:")
    for key, value in detect_backends().items():
        print(f"  {key:<20} {value}")
    return 0


def cmd_selfcheck(args: argparse.Namespace) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the spawned ranks too
    from megatron_llama import selfcheck

    return 1 if selfcheck.selfcheck(tolerance=args.tolerance) else 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from megatron_llama.data.corpus import build_builtin_corpus

    paths = build_builtin_corpus(args.output, max_code_bytes=int(args.max_code_mb * 2**20))
    for name, path in paths.items():
        print(f"{name:<6} {path}")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from megatron_llama.data.tokenizer import Tokenizer, train_tokenizer

    model = train_tokenizer(args.input, args.output_prefix, vocab_size=args.vocab_size,
                            text_key=args.text_key, max_sentences=args.max_sentences,
                            num_threads=args.threads, progress=not args.no_progress)
    tok = Tokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, unk={tok.unk_id} bos={tok.bos_id} "
          f"eos={tok.eos_id}, digits split, byte fallback)")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from megatron_llama.data.preprocess import preprocess

    stats = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                       text_key=args.text_key, add_bos=args.add_bos,
                       progress=not args.no_progress)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.summary()}")
    for record in stats.bad_examples:
        print(f"  skipped {record}")
    if stats.bad_total > len(stats.bad_examples):
        print(f"  ... all {stats.bad_total:,} listed in {args.output_prefix}.skipped.txt")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from megatron_llama.launch import relaunch_with_torchrun, under_launcher
    from megatron_llama.training.args import train_config_from_args

    if not args.data and not args.synthetic:
        raise ConfigError("pass --data BLEND.yaml (with --tokenizer) or --synthetic")
    if args.nproc_per_node and args.nproc_per_node > 1 and not under_launcher():
        return relaunch_with_torchrun(args.nproc_per_node, sys.argv[1:])
    from megatron_llama.training.loop import pretrain

    cfg = train_config_from_args(args)
    summary = pretrain(cfg)
    return 0 if summary["status"] else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from megatron_llama.training.plot import plot_log

    print(f"wrote {plot_log(args.log, args.output)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from megatron_llama.convert.run import convert

    print(convert(args.input, args.output, args.to, shards=args.shards, tp=args.tp, pp=args.pp,
                  dtype=args.dtype, force=args.force, progress=not args.no_progress))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from megatron_llama.launch import relaunch_with_torchrun, under_launcher

    if args.tp > 1 and not under_launcher():
        return relaunch_with_torchrun(args.tp, sys.argv[1:])
    from megatron_llama.generate import Sampling, generate_text

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    text = generate_text(args.checkpoint, args.prompt, sampling, tp=args.tp,
                         tokenizer_path=args.tokenizer)
    if int(os.environ.get("RANK", 0)) == 0:
        print(args.prompt + text)
    return 0


# Modules adding their own subcommand (kept light to import: heavy imports inside functions).
COMMAND_MODULES = ("megatron_llama.slurm", "megatron_llama.benchmark", "megatron_llama.planner")


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

    corpus = sub.add_parser(
        "corpus", help="write the built-in corpus (no download): stdlib code + pydoc prose",
        description="Write code.jsonl (the Python standard library's source files), prose.jsonl "
        "(pydoc_data.topics, the language reference) and blend.yaml weighting the two.")
    corpus.add_argument("--output", required=True, help="directory to write into")
    corpus.add_argument("--max-code-mb", type=float, default=8.0,
                        help="cap on the code source's size in MiB (default 8)")
    corpus.set_defaults(func=cmd_corpus)

    tok = sub.add_parser(
        "train-tokenizer", help="train a SentencePiece BPE tokenizer with the paper's settings",
        description="Train SentencePiece BPE as the LLaMA paper did: numbers split into digits, "
        "byte fallback for unknown UTF-8, identity normalisation (text round-trips exactly), "
        "ids unk=0 bos=1 eos=2. Writes <prefix>.model and <prefix>.vocab when done.")
    tok.add_argument("--input", nargs="+", required=True,
                     help=".txt (one document per line), .jsonl or .jsonl.gz files")
    tok.add_argument("--output-prefix", required=True, help="writes <prefix>.model/.vocab")
    tok.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (32000)")
    tok.add_argument("--text-key", default="text", help="JSON field holding the text (text)")
    tok.add_argument("--max-sentences", type=int, default=2_000_000,
                     help="lines sampled from the input for training (2,000,000)")
    tok.add_argument("--threads", type=int, default=None, help="trainer threads (all cores)")
    tok.add_argument("--no-progress", action="store_true",
                     help="no progress bar while the input is sampled")
    tok.set_defaults(func=cmd_train_tokenizer)

    pre = sub.add_parser(
        "preprocess", help="tokenize text/jsonl into a megatron-core indexed dataset",
        description="Tokenize .txt/.jsonl(.gz) into <prefix>.bin/.idx with EOS after every "
        "document, on several worker processes, in constant memory, with a progress bar. The "
        "output appears only when complete. Bad records (invalid JSON or UTF-8, missing or "
        "empty text) are skipped, counted and listed in <prefix>.skipped.txt.")
    pre.add_argument("--input", nargs="+", required=True,
                     help=".txt (one document per line), .jsonl or .jsonl.gz files")
    pre.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and .idx")
    pre.add_argument("--tokenizer", required=True, help="SentencePiece .model (ours or Meta's)")
    pre.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                     help="tokenizer processes (default: all cores)")
    pre.add_argument("--text-key", default="text", help="JSON field holding the text (text)")
    pre.add_argument("--add-bos", action="store_true", help="also put BOS before each document")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)

    from megatron_llama.training.args import add_pretrain_args

    pt = sub.add_parser(
        "pretrain", help="pretrain with the paper's recipe on megatron-core (torchrun/srun)",
        description="Pretrain a LLaMA preset (plus overrides) with megatron-core: TP/SP/PP/VP/DP "
        "from flags, DDP + distributed AdamW (0.9/0.95, wd 0.1, clip 1.0), 2000 warmup steps, "
        "cosine to 10%%, 4M-token batches by default. Run under torchrun or srun, or pass "
        "--nproc-per-node for local processes. Saves with dist_checkpointing every "
        "--save-interval steps and on SIGTERM/SIGUSR1, resumes from the latest checkpoint "
        "(also into another TP/PP layout). Logs loss, lr, grad norm, tokens/s/GPU, TFLOP/s/GPU "
        "and MFU to stdout, JSONL and optionally wandb.")
    add_pretrain_args(pt)
    pt.set_defaults(func=cmd_pretrain)

    conv = sub.add_parser(
        "convert", help="convert checkpoints between Meta, Megatron and Hugging Face formats",
        description="Convert a checkpoint directory (format detected) to --to. Inputs are "
        "validated before anything is written, tensors are memory-mapped and never unpickled "
        "as code, and the output appears only when complete. meta -> meta re-shards or changes "
        "dtype; -> megatron writes a model-only checkpoint `pretrain --load` starts from, under "
        "any layout; -> hf writes safetensors for transformers' LlamaForCausalLM.")
    conv.add_argument("--input", required=True, help="checkpoint directory")
    conv.add_argument("--output", required=True, help="directory to create")
    conv.add_argument("--to", required=True, choices=("meta", "megatron", "hf"),
                      help="target format")
    conv.add_argument("--shards", type=int, default=None,
                      help="Meta target: number of consolidated files (default: Meta's "
                           "original count for the model size: 1/2/4/8)")
    conv.add_argument("--tp", type=int, default=1,
                      help="Megatron target: intended tensor-parallel size (checked)")
    conv.add_argument("--pp", type=int, default=1,
                      help="Megatron target: intended pipeline-parallel size (checked)")
    conv.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                      help="output precision (default: the input's)")
    conv.add_argument("--force", action="store_true", help="replace an existing output")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)

    gen = sub.add_parser(
        "generate", help="sample text from a Meta directory or a Megatron checkpoint",
        description="Continue --prompt with a KV-cached megatron-core model loaded from a Meta "
        "directory or a `pretrain` checkpoint: greedy (--temperature 0, default) or "
        "temperature + top-p sampling. --tp 2 runs on 2 local processes.")
    gen.add_argument("--checkpoint", required=True, help="Meta directory or checkpoint root")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1 or 2 on CPU)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (0.9)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    gen.add_argument("--tokenizer", default=None,
                     help="SentencePiece model (default: the checkpoint's tokenizer.model)")
    gen.set_defaults(func=cmd_generate)

    plot = sub.add_parser("plot", help="render a run's JSONL log as PNG curves",
                          description="Plot loss (train and validation), learning rate and "
                          "tokens/s/GPU from the JSONL log `pretrain` writes.")
    plot.add_argument("log", help="log.jsonl of a run")
    plot.add_argument("--output", default="curves.png", help="PNG to write (curves.png)")
    plot.set_defaults(func=cmd_plot)

    # Commands that live with their own module: each defines `add_command(subparsers)`, which
    # adds its parser and sets `func` (a function of the parsed args returning an exit code).
    import importlib

    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module).add_command(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    import warnings

    # megatron-core warns at import about optional kernels (TE, apex) we detect ourselves.
    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"megatron-llama {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
