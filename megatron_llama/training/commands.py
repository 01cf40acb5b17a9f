"""`megatron-llama pretrain` and `megatron-llama plot`.

The `pretrain` flags are made from the fields they set: `LlamaConfig` (model overrides of the
preset, Meta's names), `ParallelLayout` (``--tp --sp --pp --vp``) and `TrainConfig` (whose
field metadata hold each flag's help, see `training.recipe.option`). A default is written
once, on its field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig
from megatron_llama.model.presets import PRESETS, get_preset
from megatron_llama.parallel import ParallelLayout
from megatron_llama.training.recipe import GROUPS, TrainConfig, cli_fields

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(LlamaConfig))


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(cls, name: str):
    """int / float / str / bool of a field, ``Optional[...]`` unwrapped."""
    kind = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _add_field(group, cls, f: dataclasses.Field, *, help: str, default: Any) -> None:
    kind = _value_type(cls, f.name)
    if kind is bool:
        group.add_argument(_flag(f), dest=f.name, action="store_true", help=help)
        return
    choices = f.metadata.get("choices")
    group.add_argument(_flag(f), dest=f.name, type=kind, default=default, choices=choices,
                       metavar=None if choices else _flag(f)[2:].replace("-", "_").upper(),
                       nargs=f.metadata.get("nargs"), help=help)


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    """Every `pretrain` flag, from the fields of LlamaConfig, ParallelLayout and TrainConfig."""
    m = p.add_argument_group("model (a preset plus overrides, Meta's field names)")
    m.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (tiny)")
    for f in dataclasses.fields(LlamaConfig):
        _add_field(m, LlamaConfig, f, help=f"override the preset's {f.name}", default=None)
    par = p.add_argument_group("parallelism (megatron-core)")
    for f in dataclasses.fields(ParallelLayout):
        _add_field(par, ParallelLayout, f, help=f.metadata["help"], default=f.default)
    par.add_argument("--nproc-per-node", type=int, default=None,
                     help="start this many local processes (torchrun) when not already "
                          "launched by torchrun or srun")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    for f in cli_fields():
        meta = f.metadata
        derived = meta["derived"] or f.default is None
        shown = "" if derived or isinstance(f.default, bool) else f" ({f.default})"
        _add_field(groups[meta["group"]], TrainConfig, f, help=meta["help"] + shown,
                   default=None if meta["derived"] else f.default)
        if f.name == "data_blend":
            groups["data"].add_argument("--synthetic", action="store_true",
                                        help="random tokens (benchmarking)")


def _one_or_list(values):
    """``--data X`` as the string X, several values as their list (weight/prefix pairs)."""
    if values is None or isinstance(values, str):
        return values
    return values[0] if len(values) == 1 else list(values)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed `pretrain` flags; unset derived values from the preset."""
    import torch

    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS if getattr(args, k) is not None}
    if args.tokenizer and "vocab_size" not in overrides:
        from megatron_llama.data.tokenizer import Tokenizer

        overrides["vocab_size"] = Tokenizer(args.tokenizer).vocab_size
    model = preset.model.replace(**overrides)
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    seq = values["seq_length"] or min(preset.seq_length, model.max_seq_len)
    global_batch = values["global_batch"] or max(1, preset.batch_tokens // seq)
    values.update(
        seq_length=seq, global_batch=global_batch,
        train_steps=values["train_steps"] or max(1, preset.train_tokens // (global_batch * seq)),
        lr=values["lr"] or preset.lr,
        dtype=values["dtype"] or ("bf16" if torch.cuda.is_available() else "fp32"),
        load_dir=values["load_dir"] or values["save_dir"],
        data_blend=None if args.synthetic else _one_or_list(values["data_blend"]))
    layout = ParallelLayout(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(ParallelLayout)})
    return TrainConfig(model=model, layout=layout, **values)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from megatron_llama.local_ranks import run_cli_ranks, under_launcher
    from megatron_llama.training.loop import preflight, pretrain

    if not args.data_blend and not args.synthetic:
        raise ConfigError("pass --data (a blend YAML, a dataset prefix, or weight/prefix pairs) "
                          "with --tokenizer, or --synthetic")
    cfg = train_config_from_args(args)
    if args.nproc_per_node and args.nproc_per_node > 1 and not under_launcher():
        # everything that can be refused is refused here, once, before any rank starts
        preflight(cfg, args.nproc_per_node, ranks_here=args.nproc_per_node, warn=False)
        return run_cli_ranks(args.nproc_per_node, sys.argv[1:])
    summary = pretrain(cfg)
    if summary.get("interrupted"):
        return 130  # Ctrl-C: the checkpoint (if --save) is complete, the exit says why
    return 0 if summary["status"] else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from megatron_llama.training.plot import plot_log

    print(f"wrote {plot_log(args.log, args.output)}")
    return 0


def add_command(subparsers) -> None:
    """Register `pretrain` and `plot`."""
    d = {f.name: f.default for f in cli_fields()}  # the recipe's defaults, from its fields
    pt = subparsers.add_parser(
        "pretrain", help="pretrain with the paper's recipe on megatron-core (torchrun/srun)",
        description="Pretrain a LLaMA preset (plus overrides) with megatron-core: TP/SP/PP/VP/DP "
        f"from flags, DDP + distributed AdamW ({d['adam_beta1']}/{d['adam_beta2']}, wd "
        f"{d['weight_decay']}, clip {d['clip_grad']}), {d['warmup_steps']} warmup steps, "
        f"cosine to {d['min_lr_ratio']:.0%}, 4M-token batches by default. Run under torchrun "
        "or srun, or pass --nproc-per-node for local processes. Saves with dist_checkpointing every "
        "--save-interval steps and on SIGTERM/SIGUSR1, resumes from the latest checkpoint "
        "(also into another TP/PP layout). Logs loss, lr, grad norm, tokens/s/GPU, TFLOP/s/GPU "
        "and MFU to stdout, JSONL and optionally wandb.")
    add_pretrain_args(pt)
    pt.set_defaults(func=cmd_pretrain)

    plot = subparsers.add_parser("plot", help="render a run's JSONL log as PNG curves",
                                 description="Plot loss (train and validation), learning rate "
                                 "and tokens/s/GPU from the JSONL log `pretrain` writes.")
    plot.add_argument("log", help="log.jsonl of a run")
    plot.add_argument("--output", default="curves.png", help="PNG to write (curves.png)")
    plot.set_defaults(func=cmd_plot)
