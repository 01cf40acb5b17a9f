"""`megatron-llama <command>`: the single console entry point.

Every command lives with its stage: each module in `COMMAND_MODULES` exposes
``add_command(subparsers)``, which adds its parser(s) and sets ``func`` (a function of the
parsed flags returning an exit code). Command modules import only the standard library and
light project modules at the top (heavy imports happen inside ``func``), so ``--help`` is
instant. A command module that fails to import is an error, never a missing command.

Errors the user can fix (`ConfigError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from megatron_llama import generate, selfcheck
from megatron_llama.bench import benchmark_command, plan_command
from megatron_llama.convert import commands as convert_commands
from megatron_llama.data import commands as data_commands
from megatron_llama.errors import ConfigError
from megatron_llama.launch import commands as launch_commands
from megatron_llama.model import commands as model_commands
from megatron_llama.training import commands as training_commands

# In `--help` order: inspect, data, train, convert and use, launch on a cluster, measure.
COMMAND_MODULES = (model_commands, selfcheck, data_commands, training_commands,
                   convert_commands, generate, launch_commands, benchmark_command, plan_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-llama",
        description="Train LLaMA the way the paper did, on megatron-core (GPU clusters or CPU).")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for module in COMMAND_MODULES:
        module.add_command(sub)
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
