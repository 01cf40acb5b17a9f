"""`megatron-llama corpus | train-tokenizer | preprocess`: the data stage's commands."""

from __future__ import annotations

import argparse
import os

from megatron_llama.data.sources import TXT_DOCUMENTS


def cmd_corpus(args: argparse.Namespace) -> int:
    from megatron_llama.data.corpus import build_builtin_corpus

    paths = build_builtin_corpus(args.output, max_code_bytes=int(args.max_code_mb * 2**20))
    for name, path in paths.items():
        print(f"{name:<6} {path}")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from megatron_llama.data.tokenizer import Tokenizer, train_tiktoken_tokenizer, train_tokenizer

    if args.kind == "tiktoken":
        model = train_tiktoken_tokenizer(
            args.input, args.output_prefix + ".model",
            vocab_size=args.vocab_size or 128256, text_key=args.text_key,
            max_sentences=args.max_sentences, progress=not args.no_progress)
        tok = Tokenizer(model)
        print(f"wrote {model} (tiktoken BPE, vocab {tok.vocab_size} = "
              f"{tok.vocab_size - 256} ranks + 256 specials, bos={tok.bos_id} eos={tok.eos_id})")
        return 0
    model = train_tokenizer(args.input, args.output_prefix, vocab_size=args.vocab_size or 32000,
                            text_key=args.text_key, max_sentences=args.max_sentences,
                            num_threads=args.threads, progress=not args.no_progress)
    tok = Tokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, unk={tok.unk_id} bos={tok.bos_id} "
          f"eos={tok.eos_id}, digits split, byte fallback)")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from megatron_llama.data.blend import add_to_blend, load_blend
    from megatron_llama.data.preprocess import check_output_prefix, preprocess

    check_output_prefix(args.output_prefix)
    if args.blend and os.path.exists(args.blend):
        load_blend(args.blend)  # a broken blend file is refused before the work, not after
    stats = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                       text_key=args.text_key, add_bos=args.add_bos,
                       progress=not args.no_progress, txt_documents=args.txt_documents)
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.summary()}")
    if args.blend:
        add_to_blend(args.blend, args.output_prefix, args.blend_weight)
        print(f"added {args.output_prefix} (weight {args.blend_weight:g}) to {args.blend}; "
              f"train on it with: megatron-llama pretrain --data {args.blend} ...")
    for record in stats.bad_examples:
        print(f"  skipped {record}")
    if stats.bad_total > len(stats.bad_examples):
        print(f"  ... all {stats.bad_total:,} listed in {args.output_prefix}.skipped.txt")
    return 0


def cmd_finetune_data(args: argparse.Namespace) -> int:
    from megatron_llama.data.finetune_data import MASK_SUFFIX, finetune_data

    stats = finetune_data(args.input, args.output_prefix, args.tokenizer, fmt=args.format,
                          template_path=args.chat_template, max_tokens=args.max_tokens,
                          overlong=args.overlong, workers=args.workers,
                          progress=not args.no_progress)
    print(f"wrote {args.output_prefix}.bin/.idx and {args.output_prefix}{MASK_SUFFIX}.bin/.idx: "
          f"{stats.summary()}")
    for record in stats.bad_examples:
        print(f"  skipped {record}")
    if stats.bad_total > len(stats.bad_examples):
        print(f"  ... all {stats.bad_total:,} listed in {args.output_prefix}.skipped.txt")
    return 0


def add_command(subparsers) -> None:
    """Register `corpus`, `train-tokenizer`, `preprocess` and `finetune-data`."""
    corpus = subparsers.add_parser(
        "corpus", help="write the built-in corpus (no download): stdlib code + pydoc prose",
        description="Write code.jsonl (the Python standard library's source files), prose.jsonl "
        "(pydoc_data.topics, the language reference), blend.yaml weighting the two, and for "
        "fine-tuning alpaca.jsonl (320 instruction records) and chat.jsonl (80 conversations), "
        "generated from computed tasks and the standard library's docstrings.")
    corpus.add_argument("--output", required=True, help="directory to write into")
    corpus.add_argument("--max-code-mb", type=float, default=8.0,
                        help="cap on the code source's size in MiB (default 8)")
    corpus.set_defaults(func=cmd_corpus)

    tok = subparsers.add_parser(
        "train-tokenizer", help="train a SentencePiece BPE tokenizer with the paper's settings",
        description="Train SentencePiece BPE as the LLaMA paper did: numbers split into digits, "
        "byte fallback for unknown UTF-8, identity normalisation (text round-trips exactly), "
        "ids unk=0 bos=1 eos=2. Writes <prefix>.model and <prefix>.vocab when done. "
        "--kind tiktoken trains a Llama 3-style byte-level BPE instead (Meta's split pattern, "
        "256 special tokens after the ranks) and writes the rank file <prefix>.model.")
    tok.add_argument("--input", nargs="+", required=True,
                     help=".txt (one document per line), .jsonl or .jsonl.gz files")
    tok.add_argument("--output-prefix", required=True, help="writes <prefix>.model/.vocab")
    tok.add_argument("--kind", choices=["sentencepiece", "tiktoken"], default="sentencepiece",
                     help="sentencepiece: LLaMA-1/2 and Code Llama's kind (default); tiktoken: "
                          "Llama 3's kind, a BPE rank file")
    tok.add_argument("--vocab-size", type=int, default=None,
                     help="vocabulary size, special tokens included (32000 for sentencepiece, "
                          "128256 for tiktoken)")
    tok.add_argument("--text-key", default="text", help="JSON field holding the text (text)")
    tok.add_argument("--max-sentences", type=int, default=2_000_000,
                     help="lines sampled from the input for training (2,000,000)")
    tok.add_argument("--threads", type=int, default=None, help="trainer threads (all cores)")
    tok.add_argument("--no-progress", action="store_true",
                     help="no progress bar while the input is sampled")
    tok.set_defaults(func=cmd_train_tokenizer)

    pre = subparsers.add_parser(
        "preprocess", help="tokenize text/jsonl into a megatron-core indexed dataset",
        description="Tokenize .txt/.jsonl(.gz) into <prefix>.bin/.idx with EOS after every "
        "document (a .txt line, paragraph or file: --txt-documents), on several worker processes, in constant memory, with a progress bar. The "
        "output appears only when complete. Bad records (invalid JSON or UTF-8, missing or "
        "empty text) are skipped, counted and listed in <prefix>.skipped.txt.")
    pre.add_argument("--input", nargs="+", required=True,
                     help=".txt (one document per line), .jsonl or .jsonl.gz files")
    pre.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and .idx")
    pre.add_argument("--tokenizer", required=True,
                     help="tokenizer.model: SentencePiece (LLaMA-1/2, Code Llama, ours) or a "
                          "tiktoken rank file (Llama 3.x), told apart by content")
    pre.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                     help="tokenizer processes (default: all cores)")
    pre.add_argument("--text-key", default="text", help="JSON field holding the text (text)")
    pre.add_argument("--add-bos", action="store_true", help="also put BOS before each document")
    pre.add_argument("--txt-documents", choices=TXT_DOCUMENTS, default="line",
                     help="how .txt inputs are cut into documents: one per line (default; blank "
                          "lines skipped), paragraphs separated by blank lines, or one per file")
    pre.add_argument("--blend", default=None, metavar="BLEND.yaml",
                     help="also add the output to this blend YAML (created if missing), the "
                          "file `pretrain --data` reads")
    pre.add_argument("--blend-weight", type=float, default=1.0,
                     help="the output's weight in --blend (1.0; weights are normalised)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)

    ft = subparsers.add_parser(
        "finetune-data", help="tokenize instruction records (Alpaca, chat) with a loss mask",
        description="Tokenize Alpaca records (instruction, input, output: Alpaca's prompt) and "
        "chat records (messages: system/user/assistant turns, in the chat format of the "
        "tokenizer's generation or --chat-template) into <prefix>.bin/.idx (tokens) and "
        "<prefix>.mask.bin/.idx (1 on response tokens: only they are trained), on worker "
        "processes, with a progress bar. Bad records are skipped, counted and listed with "
        "file:line; examples longer than --max-tokens are truncated or dropped (--overlong).")
    ft.add_argument("--input", nargs="+", required=True,
                    help=".json (a list of records, as alpaca_data.json), .jsonl or .jsonl.gz")
    ft.add_argument("--output-prefix", required=True,
                    help="writes <prefix>.bin/.idx and <prefix>.mask.bin/.idx")
    ft.add_argument("--tokenizer", required=True,
                    help="tokenizer.model of the model to fine-tune (SentencePiece or tiktoken)")
    ft.add_argument("--format", choices=["auto", "alpaca", "chat"], default="auto",
                    help="record format (auto: 'messages' -> chat, 'instruction' -> Alpaca)")
    ft.add_argument("--chat-template", default=None, metavar="FILE.jinja",
                    help="a Jinja chat template (Hugging Face's variables: messages, bos_token, "
                         "eos_token, add_generation_prompt) instead of the generation's format")
    ft.add_argument("--max-tokens", type=int, default=4096,
                    help="longest example in tokens (4096); use the fine-tuning sequence length")
    ft.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                    help="what to do with longer examples: keep their start, or skip them "
                         "(both counted)")
    ft.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                    help="tokenizer processes (default: all cores)")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.set_defaults(func=cmd_finetune_data)
