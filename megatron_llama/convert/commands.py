"""`megatron-llama convert`: any checkpoint directory to Meta, Megatron or Hugging Face."""

from __future__ import annotations

import argparse


def cmd_convert(args: argparse.Namespace) -> int:
    from megatron_llama.convert.run import convert

    print(convert(args.input, args.output, args.to, shards=args.shards, tp=args.tp, pp=args.pp,
                  dtype=args.dtype, force=args.force, progress=not args.no_progress))
    return 0


def add_command(subparsers) -> None:
    """Register `convert`."""
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
