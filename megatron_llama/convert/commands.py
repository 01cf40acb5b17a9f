"""`megatron-llama convert`: any checkpoint directory to Meta, Megatron or Hugging Face."""

from __future__ import annotations

import argparse


def cmd_convert(args: argparse.Namespace) -> int:
    from megatron_llama.convert.run import convert

    print(convert(args.input, args.output, args.to, shards=args.shards, tp=args.tp, pp=args.pp,
                  dtype=args.dtype, force=args.force, progress=not args.no_progress,
                  base=args.base))
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from megatron_llama.convert.run import is_adapter_checkpoint
    from megatron_llama.errors import ConfigError

    if not is_adapter_checkpoint(args.input):
        raise ConfigError(f"{args.input}: not a LoRA adapter checkpoint (its "
                          "megatron_llama.json has no adapters_only)")
    return cmd_convert(args)


def _output_flags(p) -> None:
    p.add_argument("--shards", type=int, default=None,
                   help="Meta target: number of consolidated files (default: Meta's "
                        "original count for the model size: 1/2/4/8)")
    p.add_argument("--tp", type=int, default=1,
                   help="Megatron target: intended tensor-parallel size (checked)")
    p.add_argument("--pp", type=int, default=1,
                   help="Megatron target: intended pipeline-parallel size (checked)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="output precision (default: the input's)")
    p.add_argument("--base", default=None,
                   help="LoRA input: the base checkpoint (default: the one the run started "
                        "from, recorded in its metadata)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_command(subparsers) -> None:
    """Register `convert` and `merge-lora`."""
    conv = subparsers.add_parser(
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
    _output_flags(conv)
    conv.set_defaults(func=cmd_convert)

    merge = subparsers.add_parser(
        "merge-lora", help="merge a LoRA run's adapters into its base, in any format",
        description="Write base + (alpha / rank) B A for every adapted linear of a LoRA "
        "fine-tuning run (`finetune --lora-rank`) as a full checkpoint: Meta, Hugging Face or "
        "Megatron. The base is the checkpoint the run started from (or --base). The same as "
        "`convert` on the run's directory, which merges too.")
    merge.add_argument("--input", required=True, help="the LoRA run's --save directory")
    merge.add_argument("--output", required=True, help="directory to create")
    merge.add_argument("--to", required=True, choices=("meta", "megatron", "hf"),
                       help="target format")
    _output_flags(merge)
    merge.set_defaults(func=cmd_merge_lora)
