"""`megatron-llama <command>`: the single console entry point.

Every command lives with its stage: each module in `COMMAND_MODULES` exposes
``add_command(subparsers)``, which adds its parser(s) and sets ``func`` (a function of the
parsed flags returning an exit code). Command modules import only the standard library and
light project modules at the top (heavy imports happen inside ``func``), so ``--help`` is
instant. A command module that fails to import is an error, never a missing command.

Errors the user can fix (`ConfigError`) are printed as one line, exit code 2; Ctrl-C as one
line, exit code 130.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable, Optional

from megatron_llama import generate, selfcheck
from megatron_llama.bench import benchmark_command, plan_command
from megatron_llama.convert import commands as convert_commands
from megatron_llama.data import commands as data_commands
from megatron_llama.errors import ConfigError
from megatron_llama.evaluate import commands as evaluate_commands
from megatron_llama.finetune import commands as finetune_commands
from megatron_llama.launch import commands as launch_commands
from megatron_llama.model import commands as model_commands
from megatron_llama.training import commands as training_commands

# In `--help` order: inspect, data, train, convert and use, launch on a cluster, measure.
COMMAND_MODULES = (model_commands, selfcheck, data_commands, training_commands,
                   finetune_commands, convert_commands, generate, evaluate_commands,
                   launch_commands, benchmark_command, plan_command)


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
    interrupted: list[int] = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if main_thread else None
    try:
        return func(args)
    except ConfigError as e:
        print(f"megatron-llama {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:
        # Ctrl-C, however deep it surfaced (a worker pool, a C++ writer): one line. Every
        # output is staged and appears only when complete, so nothing partial is left.
        if not (interrupted or isinstance(e, KeyboardInterrupt)):
            raise
        print(f"megatron-llama {args.command}: interrupted; nothing partial was written",
              file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
