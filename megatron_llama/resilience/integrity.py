"""Checksums of a checkpoint's files: recorded at save, verified before use.

A checkpoint's metadata (``megatron_llama.json``) holds ``"files": {relative path: {"bytes":
n, "crc32": "8 hex digits"}}`` for every file of the folder but the metadata itself. CRC-32
(zlib, GB/s on one core) detects flipped bits and torn writes; sizes catch truncation before a
byte is read. Files are read in 8 MiB chunks, so memory stays flat for any shard size, and
the work is split over the ranks (`share`): each rank checks or sums its share of the
files (the engines gather the results).
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Iterable, Optional

from megatron_llama.checkpoint_files import METADATA, TAG_PREFIX, read_checkpoint_metadata

_CHUNK = 8 << 20
_ITERATION_DIR = re.compile(rf"^{TAG_PREFIX}(\d+)$")


def list_files(folder: str) -> list[str]:
    """Every regular file under ``folder`` (relative, sorted), the metadata file excepted."""
    out = []
    for base, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder)
            if rel != METADATA:
                out.append(rel)
    return sorted(out)


def share(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's part of ``names`` when ``world`` ranks split the work."""
    return names[rank::world]


def crc32_of(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_files(folder: str, names: Iterable[str]) -> dict[str, dict]:
    """``{name: {"bytes": size, "crc32": hex}}`` of the named files of ``folder``."""
    return {n: {"bytes": os.path.getsize(os.path.join(folder, n)),
                "crc32": crc32_of(os.path.join(folder, n))} for n in names}


def verify_files(folder: str, manifest: dict[str, dict], names: Iterable[str]) -> Optional[str]:
    """The first problem (a one-line message naming the file) among the named files of the
    manifest, or None when they are all as recorded."""
    for name in names:
        path = os.path.join(folder, name)
        want = manifest[name]
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return f"{path}: missing (the checkpoint recorded it)"
        if size != want["bytes"]:
            return f"{path}: {size:,} bytes, but the checkpoint recorded {want['bytes']:,} (truncated?)"
        if crc32_of(path) != want["crc32"]:
            return f"{path}: checksum differs from the one recorded at save (damaged)"
    return None


def manifest_of(folder: str) -> Optional[dict[str, dict]]:
    """The recorded checksums of a checkpoint folder, or None (saved before checksums were
    recorded, or not by us): nothing to verify then."""
    files = read_checkpoint_metadata(folder).get("files")
    return files if isinstance(files, dict) else None


def verify_folder(folder: str) -> Optional[str]:
    """Every recorded file of ``folder`` checked in this process (`convert`, `generate`)."""
    manifest = manifest_of(folder)
    return None if manifest is None else verify_files(folder, manifest, sorted(manifest))


def is_committed(folder: str) -> bool:
    """A checkpoint folder whose save finished (its metadata is written last)."""
    return os.path.isfile(os.path.join(folder, METADATA))


def complete_iterations(root: str) -> list[int]:
    """Iterations under ``root`` that were committed (``iter_N`` with metadata; a ``.tmp``
    folder is a save that did not finish), newest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _ITERATION_DIR.match(name)
        if m and is_committed(os.path.join(root, name)):
            found.append(int(m.group(1)))
    return sorted(found, reverse=True)
