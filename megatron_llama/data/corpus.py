"""A built-in corpus that needs no download: text every Python installation carries.

Two sources, like a miniature of the paper's mixture:
- ``code``: the standard library's ``.py`` files, one document per file (the paper's GitHub
  share), in sorted path order, up to ``max_code_bytes``;
- ``prose``: the English reference text of ``pydoc_data.topics`` (the language reference
  behind ``help()``), one document per topic.

`build_builtin_corpus` writes ``code.jsonl`` and ``prose.jsonl`` (atomically) and a blend
file ``blend.yaml`` whose prefixes point at ``code``/``prose`` datasets that
``megatron-llama preprocess`` creates next to them.
"""

from __future__ import annotations

import json
import os
import sysconfig
from typing import Iterator

from megatron_llama.fileio import atomic_write, write_text

BLEND_TEMPLATE = """\
# Built-in corpus (no download): Python standard library source + pydoc topics.
split: "90,8,2"
sources:
  - name: code
    prefix: code
    weight: {code_weight}
  - name: prose
    prefix: prose
    weight: {prose_weight}
"""


def stdlib_documents(max_bytes: int) -> Iterator[dict]:
    """{"text", "source"} for each stdlib .py file (sorted; site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue  # a few test files are deliberately not UTF-8
            if not text.strip():
                continue
            total += len(text.encode("utf-8"))
            if total > max_bytes:
                return
            yield {"text": text, "source": os.path.relpath(path, root)}


def pydoc_documents() -> Iterator[dict]:
    """{"text", "source"} for each topic of the interpreter's language reference."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"text": text, "source": f"pydoc:{name}"}


def _write_jsonl(path: str, docs: Iterator[dict]) -> int:
    count = 0

    def write(f) -> None:
        nonlocal count
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1

    atomic_write(path, write)
    return count


def build_builtin_corpus(out_dir: str, max_code_bytes: int = 8 << 20,
                         code_weight: float = 0.6, prose_weight: float = 0.4) -> dict[str, str]:
    """Write the corpus files into ``out_dir``; returns their paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    from megatron_llama.data.instruction_set import alpaca_records, chat_records

    paths = {"code": os.path.join(out_dir, "code.jsonl"),
             "prose": os.path.join(out_dir, "prose.jsonl"),
             "blend": os.path.join(out_dir, "blend.yaml"),
             "alpaca": os.path.join(out_dir, "alpaca.jsonl"),
             "chat": os.path.join(out_dir, "chat.jsonl")}
    _write_jsonl(paths["code"], stdlib_documents(max_code_bytes))
    _write_jsonl(paths["prose"], pydoc_documents())
    _write_jsonl(paths["alpaca"], iter(alpaca_records()))  # fine-tuning: instructions
    _write_jsonl(paths["chat"], iter(chat_records()))
    write_text(paths["blend"], BLEND_TEMPLATE.format(code_weight=code_weight,
                                                     prose_weight=prose_weight))
    return paths
