"""Writing output files whole or not at all.

Every file the tools write lands through `atomic_write`: the content goes to a temporary
file beside the destination, which is renamed over it only once complete, so a crash or
Ctrl-C never leaves a half-written script, report or chart. Checkpoints and converted models
use the same idea for whole directories (`convert.meta.commit_output`,
`training.checkpoint.save`).
"""

from __future__ import annotations

import json
import os
from typing import IO, Callable

from megatron_llama.config import ConfigError


def output_path(path: str) -> str:
    """``path`` as a file to write: its folder is created, a directory there is an error."""
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create its folder ({e.strerror})") from None
    return path


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> str:
    """Call ``write(f)`` on a temporary file, then rename it to ``path``; returns ``path``.

    A path that exists and is not a regular file (``/dev/stdout``, a pipe) is written
    directly. Failures of the file system are one-line `ConfigError`s."""
    output_path(path)
    # text: UTF-8, "\n" written as is (csv writes its own line ends)
    text = {} if binary else {"encoding": "utf-8", "newline": ""}
    mode = "wb" if binary else "w"
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, mode, **text) as f:
            write(f)
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **text) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str, text: str, executable: bool = False) -> str:
    """``text`` to ``path`` atomically (mode 0755 if ``executable``)."""
    def write(f: IO) -> None:
        f.write(text)
        if executable:
            os.fchmod(f.fileno(), 0o755)

    return atomic_write(path, write)


def write_json(obj, path: str) -> str:
    """``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2))
