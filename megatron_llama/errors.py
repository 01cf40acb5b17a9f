"""The one error type users see, and the JSON reader every config file goes through.

`ConfigError` carries a one-line message for the user (the CLI prints it and exits 2, under
torchrun too); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A configuration or layout that cannot work; the message is one line for the user."""


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
