"""Reading raw text inputs: .txt, .jsonl and their .gz forms, with bad records accounted for.

- ``.txt`` / ``.txt.gz``: by ``txt_documents`` (`TXT_DOCUMENTS`): one document per line
  (``line``, blank lines are skipped), paragraphs separated by blank lines (``paragraph``),
  or the whole file (``file``).
- ``.jsonl`` / ``.jsonl.gz`` (also ``.json``): one JSON object per line, text in ``text_key``.

Lines are read as bytes and streamed (memory does not grow with the input). A record that
cannot become a document (invalid UTF-8, invalid JSON, missing or non-string text field,
empty text) is never silently dropped: `parse_record` returns the reason, and callers count
and report it with file and line number.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional

from megatron_llama.errors import ConfigError

TXT_DOCUMENTS = ("line", "paragraph", "file")
KINDS = {".txt": "txt", ".txt.gz": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
         ".json": "jsonl", ".json.gz": "jsonl"}


@dataclass(frozen=True)
class Document:
    path: str
    line: int  # 1-based line number in the (decompressed) file
    text: str


@dataclass(frozen=True)
class BadRecord:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"

    @property
    def category(self) -> str:
        """The reason without its details: 'invalid JSON', 'empty text', ..."""
        return self.reason.split(" (")[0]


def input_kind(path: str) -> str:
    """'txt' or 'jsonl' from the file name; a one-line error for anything else."""
    for ext, kind in KINDS.items():
        if path.endswith(ext):
            return kind
    raise ConfigError(f"{path}: unknown input format (expected .txt, .jsonl, .jsonl.gz or .txt.gz)")


def check_inputs(paths: list[str]) -> None:
    """Fail before any work if an input is missing, unreadable or of unknown format."""
    if not paths:
        raise ConfigError("no input files given")
    for path in paths:
        input_kind(path)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: input file not found")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{path}: input file not readable")


class LineReader:
    """Raw lines of one input file, decompressing .gz; ``position`` is the on-disk offset."""

    def __init__(self, path: str):
        self.path = path
        self._raw: BinaryIO = open(path, "rb")
        self._stream: BinaryIO = (gzip.GzipFile(fileobj=self._raw, mode="rb")
                                  if path.endswith(".gz") else self._raw)

    @property
    def position(self) -> int:
        return self._raw.tell()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, raw bytes without the newline)."""
        try:
            for number, raw in enumerate(self._stream, start=1):
                yield number, raw.rstrip(b"\r\n")
        except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or corrupt .gz
            raise ConfigError(f"{self.path}: cannot read ({e})") from None

    def records(self, kind: str, txt_documents: str = "line") -> Iterator[tuple[int, bytes]]:
        """(line number where it starts, raw bytes) of each record of this file: a line of
        a .jsonl file; of a .txt file a line, a paragraph or the whole file. Blank lines of a
        .txt file only separate documents: they are not records."""
        if kind != "txt":
            yield from self
            return
        if txt_documents not in TXT_DOCUMENTS:
            raise ValueError(f"txt_documents must be one of {TXT_DOCUMENTS}")
        if txt_documents == "line":
            yield from ((n, raw) for n, raw in self if raw.strip())
            return
        lines: list[bytes] = []
        first = 0
        for number, raw in self:
            if txt_documents == "paragraph" and not raw.strip():
                if lines:
                    yield first, b"\n".join(lines)
                lines = []
                continue
            if not lines:
                first = number
            lines.append(raw)
        if lines:
            yield first, b"\n".join(lines)

    def close(self) -> None:
        self._stream.close()
        self._raw.close()

    def __enter__(self) -> "LineReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_record(raw: bytes, kind: str, text_key: str = "text") -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a good record, (None, reason) for a bad one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 (at byte {e.start})"
    if kind == "txt":
        text = line
    else:
        if not line.strip():
            return None, "empty line"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return None, f"invalid JSON ({e.msg} at column {e.colno})"
        if not isinstance(record, dict) or text_key not in record:
            return None, f"missing text field {text_key!r}"
        text = record[text_key]
        if not isinstance(text, str):
            return None, f"text field {text_key!r} is not a string"
    if not text.strip():
        return None, "empty text"
    return text, None


def iter_documents(paths: list[str], text_key: str = "text",
                   on_bad: Optional[Callable[[BadRecord], None]] = None,
                   txt_documents: str = "line") -> Iterator[Document]:
    """Every good document of ``paths`` in order; bad records go to ``on_bad`` (if given)."""
    check_inputs(paths)
    for path in paths:
        kind = input_kind(path)
        with LineReader(path) as reader:
            for number, raw in reader.records(kind, txt_documents):
                text, reason = parse_record(raw, kind, text_key)
                if text is not None:
                    yield Document(path, number, text)
                elif on_bad is not None:
                    on_bad(BadRecord(path, number, reason))
