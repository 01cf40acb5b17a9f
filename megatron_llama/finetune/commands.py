"""`megatron-llama finetune`: instruction fine-tuning (full or LoRA) from any checkpoint.

The flags are `pretrain`'s (layout, checkpoints, fault tolerance, logging) plus the
fine-tuning ones below; the model comes from ``--from`` and the recipe's values fill every
optimizer and batch flag left unset.
"""

from __future__ import annotations

import argparse
import sys

from megatron_llama.errors import ConfigError
from megatron_llama.finetune.recipe import LORA_TARGETS, RECIPES

# `pretrain` flags whose default comes from the recipe here (None = "not given")
RECIPE_FLAGS = ("lr", "seq_length", "global_batch", "weight_decay", "min_lr_ratio",
                "adam_beta1", "adam_beta2", "clip_grad", "warmup_steps", "train_steps")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    from megatron_llama.training.commands import add_pretrain_args

    f = p.add_argument_group("fine-tuning")
    f.add_argument("--from", dest="init_from", required=True, metavar="DIR",
                   help="checkpoint to start from: Meta (params.json + consolidated.NN.pth), "
                        "Hugging Face, or a megatron-llama run/conversion; the model's shape "
                        "and (if present) its tokenizer come from it")
    f.add_argument("--recipe", default="alpaca", choices=tuple(RECIPES),
                   help="alpaca: lr 2e-5, 3 epochs, warmup 3%%, cosine to 0, 128 x 512, no "
                        "weight decay; llama-i: the LLaMA paper's instruction tuning as this "
                        "project reads it (docs/finetuning.md) (alpaca)")
    f.add_argument("--epochs", type=float, default=None,
                   help="passes over the training rows (default: the recipe's); "
                        "--train-steps overrides it")
    f.add_argument("--warmup-ratio", type=float, default=None,
                   help="warmup as a fraction of the steps (default: the recipe's 0.03); "
                        "--warmup-steps overrides it")
    f.add_argument("--valid-fraction", type=float, default=0.02,
                   help="examples held out for the validation loss, evaluated once per "
                        "epoch unless --eval-interval says otherwise (0.02)")
    f.add_argument("--no-pack", dest="packed", action="store_false",
                   help="one example per row (Alpaca's own batches) instead of packing "
                        "examples into rows first-fit-decreasing")
    lo = p.add_argument_group("LoRA (off unless --lora-rank)")
    lo.add_argument("--lora-rank", type=int, default=0,
                    help="adapter rank; 0 = full fine-tuning (0)")
    lo.add_argument("--lora-alpha", type=float, default=16.0,
                    help="adapter scale numerator: updates are (alpha / rank) B A x (16)")
    lo.add_argument("--lora-dropout", type=float, default=0.05,
                    help="dropout on the adapters' input (0.05)")
    lo.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS),
                    metavar="LINEAR", help=f"linears to adapt ({' '.join(LORA_TARGETS)})")
    add_pretrain_args(p)
    p.set_defaults(preset=None, **{k: None for k in RECIPE_FLAGS})
    helps = {"--preset": "a preset the --from checkpoint must match in shape (default: the "
                         "checkpoint's own shape)",
             "--data": "the prefix `megatron-llama finetune-data` wrote (PREFIX.bin/.idx and "
                       "PREFIX.mask.bin/.idx)",
             "--tokenizer": "tokenizer.model the data was tokenized with (default: the "
                            "checkpoint's own)"}
    for flag, text in helps.items():
        p._option_string_actions[flag].help = text
    for flag in RECIPE_FLAGS:  # their pretraining defaults do not apply: the recipe's do
        action = p._option_string_actions["--" + flag.replace("_", "-")]
        action.help = action.help.split(" (")[0] + {
            "train_steps": " (default: --epochs passes over the training rows)",
            "warmup_steps": " (default: --warmup-ratio of the steps)"}.get(
                flag, " (default: the recipe's)")


def finetune_config_from_args(args: argparse.Namespace):
    """(TrainConfig, FinetuneOptions) of parsed `finetune` flags: the model from ``--from``,
    the recipe's values for unset flags, steps from the epochs over the planned rows."""
    import dataclasses

    import torch

    from megatron_llama.convert.run import open_source
    from megatron_llama.data.sft import SFTData
    from megatron_llama.finetune.recipe import (
        FinetuneOptions,
        LoraSettings,
        recipe_defaults,
        steps_for,
        warmup_for,
    )
    from megatron_llama.model.canonical import shape_mismatch
    from megatron_llama.model.presets import get_preset
    from megatron_llama.parallel import ParallelLayout
    from megatron_llama.training.commands import MODEL_FIELDS
    from megatron_llama.training.recipe import TrainConfig, cli_fields

    if args.synthetic or not args.data_blend:
        raise ConfigError("finetune needs --data PREFIX (the output of `megatron-llama "
                          "finetune-data`)")
    if len(args.data_blend) != 1:
        raise ConfigError("finetune takes one --data prefix (merge instruction files in "
                          "`finetune-data`, which accepts several inputs)")
    with open_source(args.init_from) as source:
        model, source_tokenizer = source.config, source.tokenizer
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS  # (a flag not given: None / False)
                 if getattr(args, k) is not None and getattr(args, k) is not False}
    if args.preset:  # a preset only states the shape expected of the checkpoint
        problems = shape_mismatch(model, get_preset(args.preset).model.replace(**overrides))
        if problems:
            raise ConfigError(f"{args.init_from}: does not fit --preset {args.preset} "
                              f"({'; '.join(problems[:2])})")
    wanted = model.replace(**overrides)  # the checkpoint's model; flags change what they name
    problems = shape_mismatch(model, wanted)
    if problems:
        raise ConfigError(f"{args.init_from}: does not fit the model flags "
                          f"({'; '.join(problems[:2])})")
    tokenizer = args.tokenizer or source_tokenizer
    if not tokenizer:
        raise ConfigError(f"{args.init_from}: no tokenizer.model found with the checkpoint; "
                          "pass --tokenizer (the one --data was tokenized with)")
    recipe = recipe_defaults(args.recipe)
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    for k in RECIPE_FLAGS:
        if values[k] is None and k in recipe:
            values[k] = recipe[k]
    values["seq_length"] = min(values["seq_length"], wanted.max_seq_len)
    if args.valid_fraction and not 0 <= args.valid_fraction < 1:
        raise ConfigError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    lora = None
    if args.lora_rank:
        lora = LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout,
                            tuple(args.lora_targets))
        lora.check()
    opts = FinetuneOptions(init_from=args.init_from, data_prefix=args.data_blend[0],
                           recipe=args.recipe,
                           epochs=args.epochs if args.epochs is not None else recipe["epochs"],
                           warmup_ratio=(args.warmup_ratio if args.warmup_ratio is not None
                                         else recipe["warmup_ratio"]),
                           valid_fraction=args.valid_fraction, packed=args.packed, lora=lora)
    plan = SFTData(opts.data_prefix, seq_length=values["seq_length"],
                   global_batch=values["global_batch"], micro_batch=values["micro_batch"],
                   valid_fraction=opts.valid_fraction, seed=values["seed"], packed=opts.packed)
    per_epoch = steps_for(len(plan.train_rows), values["global_batch"], 1.0)
    values["train_steps"] = values["train_steps"] or steps_for(
        len(plan.train_rows), values["global_batch"], opts.epochs)
    if values["warmup_steps"] is None:
        values["warmup_steps"] = warmup_for(values["train_steps"], opts.warmup_ratio)
    if not values["eval_interval"] and plan.valid_rows:
        values["eval_interval"] = min(per_epoch, values["train_steps"])
    values.update(
        dtype=values["dtype"] or ("bf16" if torch.cuda.is_available() else "fp32"),
        load_dir=values["load_dir"] or values["save_dir"], tokenizer=tokenizer,
        data_blend=None)
    layout = ParallelLayout(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(ParallelLayout)})
    return TrainConfig(model=wanted, layout=layout, **values), opts


def cmd_finetune(args: argparse.Namespace) -> int:
    from megatron_llama.finetune.run import check_finetune, finetune
    from megatron_llama.local_ranks import run_cli_ranks, under_launcher
    from megatron_llama.training.loop import preflight

    cfg, opts = finetune_config_from_args(args)
    check_finetune(cfg, opts)
    if args.nproc_per_node and args.nproc_per_node > 1 and not under_launcher():
        preflight(cfg, args.nproc_per_node, ranks_here=args.nproc_per_node, warn=False)
        return run_cli_ranks(args.nproc_per_node, sys.argv[1:])
    summary = finetune(cfg, opts)
    if summary.get("interrupted"):
        return 130
    return 0 if summary["status"] else 1


def add_command(subparsers) -> None:
    """Register `finetune`."""
    p = subparsers.add_parser(
        "finetune", help="instruction fine-tuning (full or LoRA) from a Meta/HF/Megatron "
        "checkpoint",
        description="Fine-tune a checkpoint of any LLaMA generation on `finetune-data` "
        "output: loss on the responses only, examples packed into rows with attention kept "
        "inside each example, the Alpaca recipe by default (or llama-i), a held-out "
        "validation loss, any TP/PP/DP layout, and everything `pretrain` does (checkpoints, "
        "exact resume, signals, logs, wandb). --lora-rank trains adapters over a frozen base "
        "and saves only them; `merge-lora` (or `convert`) writes the merged model.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)
