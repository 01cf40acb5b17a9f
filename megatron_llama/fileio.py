"""Writing output files whole or not at all.

Every file the tools write lands through `atomic_write`: the content goes to a temporary
file beside the destination, which is renamed over it only once complete, so a crash or
Ctrl-C never leaves a half-written script, report or chart. Whole directories (converted
models, checkpoints) do the same through `staged_directory`, or `stage_directory` plus
`commit_directory` when several processes fill the directory (a checkpoint save).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import IO, Callable, Iterator, Optional

from megatron_llama.errors import ConfigError


def respect_umask(path: str, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: 0666 / 0777 minus the umask.

    Temporary files and directories (``mkstemp``, ``mkdtemp``) are created 0600 / 0700; an
    output renamed from one would otherwise be private to its owner."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


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


def write_figure(fig, path: str, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG at ``path``, atomically; the figure is closed after."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
    finally:
        plt.close(fig)


def write_json(obj, path: str) -> str:
    """``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2))


# Written into every directory a tool builds with `staged_directory(..., owner=...)`: only a
# directory that holds it (or an empty one) is ever replaced by ``--force``.
OUTPUT_MARKER = ".megatron-llama-output.json"


def written_by(directory: str) -> Optional[str]:
    """The tool that wrote ``directory`` (its `OUTPUT_MARKER`), or None."""
    try:
        with open(os.path.join(directory, OUTPUT_MARKER), encoding="utf-8") as f:
            value = json.load(f).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_replaceable(output: str, owner: str) -> None:
    """Refuse to replace ``output`` unless it is missing, empty, or written by ``owner``."""
    if os.path.isdir(output) and os.listdir(output) and written_by(output) != owner:
        raise ConfigError(f"{output}: exists and was not written by `megatron-llama {owner}`; "
                          "--force replaces only an earlier output of it: remove the directory "
                          "yourself or choose another --output")


def stage_directory(output: str, force: bool = False, owner: Optional[str] = None) -> str:
    """A fresh, empty temporary directory beside ``output`` to build it in.

    An existing ``output`` is refused unless ``force`` (it is replaced only at the commit);
    an existing file there is always refused. With ``owner`` (e.g. "convert"), ``force``
    replaces only an empty directory or one an earlier run of that tool wrote."""
    if os.path.exists(output) and not force:
        raise ConfigError(f"{output}: already exists (pass --force to replace it)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"{output}: is a file; the output is a directory")
    if owner:
        check_replaceable(output, owner)
    parent = os.path.dirname(os.path.abspath(output)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.tmp-")
        respect_umask(tmp, directory=True)
        return tmp
    except OSError as e:
        raise ConfigError(f"{output}: cannot create it ({e.strerror or e})") from None


def commit_directory(tmp: str, output: str) -> None:
    """Move a complete directory ``tmp`` to ``output``, replacing an old one.

    The old output is first renamed aside and deleted only after the new one is in place,
    so a crash at any point leaves one complete copy under ``output`` or its aside name."""
    if not os.path.exists(output):
        os.replace(tmp, output)
        return
    aside = f"{tmp}.old"
    os.replace(output, aside)
    os.replace(tmp, output)
    shutil.rmtree(aside)


@contextlib.contextmanager
def staged_directory(output: str, force: bool = False,
                     owner: Optional[str] = None) -> Iterator[str]:
    """Build the directory ``output`` in a temporary sibling; it appears only when complete.

    ``with staged_directory(out) as tmp:`` fill ``tmp``; on success it is committed
    (`commit_directory`), on any exception (Ctrl-C included) removed, and ``output`` is as
    it was before. ``owner`` is recorded in the directory's `OUTPUT_MARKER` (see
    `stage_directory`)."""
    tmp = stage_directory(output, force, owner)
    try:
        yield tmp
        if owner:
            write_json({"written_by": owner, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                       os.path.join(tmp, OUTPUT_MARKER))
        commit_directory(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
