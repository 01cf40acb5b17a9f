"""The one error type users see, and the JSON reader every config file goes through.

`ConfigError` carries a one-line message for the user (the CLI prints it and exits 2, under
torchrun too); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A configuration or layout that cannot work; the message is one line for the user."""


# Exit status of a rank whose watchdog found no progress (`resilience.watchdog`), as
# timeout(1)'s: launchers show every rank's report instead of hiding them as follow-ons.
HANG_EXIT_CODE = 124


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file that must hold an object (params.json, config.json, checkpoint metadata);
    a missing, unreadable or malformed file is a one-line `ConfigError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


# Optional parts of the package and the extra that installs each (setup.py extras_require).
EXTRAS = {"deepspeed": "deepspeed", "wandb": "wandb", "matplotlib": "plot",
          "transformers": "hf"}


def check_installed(module: str, purpose: str) -> None:
    """Like `require`, without importing the module (a check before any work starts)."""
    import importlib.util

    if importlib.util.find_spec(module.split(".")[0]) is None:
        require(module, purpose)


def require(module: str, purpose: str):
    """Import the optional ``module`` or stop with one line naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if getattr(e, "name", None) not in (None, top) and not str(e.name).startswith(top):
            raise  # the package is there but broken inside: keep the real error
        extra = EXTRAS.get(top, top)
        raise ConfigError(f"{purpose} needs {top}, which is not installed: pip install "
                          f"'megatron_llama[{extra}]' (or pip install {top})") from None
