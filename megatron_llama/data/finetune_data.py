"""`megatron-llama finetune-data`: instruction records -> token and loss-mask datasets.

Inputs are Alpaca or chat records (`data.instructions`) in ``.json`` (one JSON array, as
Alpaca's ``alpaca_data.json``), ``.jsonl`` or ``.jsonl.gz`` files. Output: two megatron-core
indexed datasets with the same documents, ``<prefix>.bin/.idx`` (token ids, each example
BOS ... EOS) and ``<prefix>.mask.bin/.idx`` (uint8, 1 on response tokens). Records are
tokenized on worker processes in batches, in input order, with a progress bar; a record that
cannot be trained on (no response, roles out of order, not an object, ...) is skipped,
counted and listed with ``file:line`` (for a .json array: ``file:[index]``) in
``<prefix>.skipped.txt``. An example longer than ``max_tokens`` is truncated (its start kept)
or dropped, as ``overlong`` says, and counted. The files appear only when complete: the mask
pair first, then the token pair, each written to temporary files and renamed.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megatron_llama.data.indexed import IndexedDatasetWriter
from megatron_llama.data.instructions import BadExample, fit_length, tokenize_record
from megatron_llama.data.sources import BadRecord, LineReader
from megatron_llama.data.tokenizer import Tokenizer, token_dtype
from megatron_llama.errors import ConfigError

BATCH_RECORDS = 256
MASK_SUFFIX = ".mask"

_worker: dict = {}


@dataclass
class FinetuneDataStats:
    examples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    seconds: float = 0.0
    bad: collections.Counter = field(default_factory=collections.Counter)
    bad_examples: list = field(default_factory=list)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        share = self.response_tokens / max(self.tokens, 1)
        bad = (": " + ", ".join(f"{r} {n}" for r, n in self.bad.most_common())) if self.bad else ""
        return (f"{self.examples:,} examples, {self.tokens:,} tokens ({share:.0%} in the loss) "
                f"in {self.seconds:.1f} s; {self.truncated:,} truncated, "
                f"{self.dropped_overlong:,} dropped as too long; skipped {self.bad_total:,} bad "
                f"record(s){bad}")


def _records(path: str) -> Iterator[tuple[str, bytes]]:
    """(where, raw JSON bytes) of each record: ``12`` for a line, ``[3]`` in an array."""
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a .json input must hold a list of records")
        for i, record in enumerate(data):
            yield f"[{i}]", json.dumps(record).encode()
        return
    if not path.endswith((".jsonl", ".jsonl.gz")):
        raise ConfigError(f"{path}: unknown input format (expected .json, .jsonl or .jsonl.gz)")
    with LineReader(path) as reader:
        for number, raw in reader:
            yield str(number), raw


def _init_worker(model: str, fmt: str, template: Optional[str], max_tokens: int,
                 overlong: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker.update(tokenizer=Tokenizer(model), fmt=fmt, template=template,
                   max_tokens=max_tokens, overlong=overlong)


def encode_records(batch: list[tuple[str, bytes]], context: Optional[dict] = None):
    """Tokenize one batch: (ids, mask, lengths, [(where, reason)], truncated, dropped)."""
    ctx = context or _worker
    tok = ctx["tokenizer"]
    ids_out: list[list[int]] = []
    mask_out: list[list[int]] = []
    bad, truncated, dropped = [], 0, 0
    for where, raw in batch:
        if not raw.strip():
            bad.append((where, "blank line"))
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append((where, f"invalid JSON ({e.msg if hasattr(e, 'msg') else e})"))
            continue
        try:
            ids, mask = tokenize_record(tok, record, ctx["fmt"], ctx["template"])
        except BadExample as e:
            bad.append((where, str(e)))
            continue
        fitted = fit_length(ids, mask, ctx["max_tokens"], ctx["overlong"])
        if fitted is None:
            dropped += 1
            continue
        truncated += len(fitted[0]) < len(ids)
        ids_out.append(fitted[0])
        mask_out.append(fitted[1])
    lengths = np.fromiter(map(len, ids_out), dtype=np.int64, count=len(ids_out))
    flat = np.fromiter((t for d in ids_out for t in d), dtype=token_dtype(tok.vocab_size),
                       count=int(lengths.sum()))
    flat_mask = np.fromiter((t for d in mask_out for t in d), dtype=np.uint8,
                            count=int(lengths.sum()))
    return flat, flat_mask, lengths, bad, truncated, dropped


def check_template(template_path: Optional[str]) -> Optional[str]:
    """The text of a user's Jinja chat template, parsed once now (one line if it cannot)."""
    if template_path is None:
        return None
    from megatron_llama.data.chat import compile_template

    try:
        with open(template_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{template_path}: cannot read the chat template ({e.strerror})") from None
    try:
        compile_template(text)
    except ConfigError as e:
        raise ConfigError(f"{template_path}: {e}") from None
    return text


def finetune_data(inputs: list[str], output_prefix: str, tokenizer_model: str, *,
                  fmt: str = "auto", template_path: Optional[str] = None,
                  max_tokens: int = 4096, overlong: str = "truncate", workers: int = 1,
                  progress: bool = True, show_bad: int = 10) -> FinetuneDataStats:
    """Tokenize instruction records into ``<prefix>`` and ``<prefix>.mask`` (module doc)."""
    import multiprocessing as mp

    from tqdm import tqdm

    from megatron_llama.data.preprocess import check_output_prefix

    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"--overlong must be truncate or drop, not {overlong!r}")
    if max_tokens < 2:
        raise ConfigError(f"--max-tokens must be at least 2, got {max_tokens}")
    check_output_prefix(output_prefix)
    for path in inputs:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such input file")
    template = check_template(template_path)
    tok = Tokenizer(tokenizer_model)
    args = (tokenizer_model, fmt, template, max_tokens, overlong)
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = context.Pool(workers, _init_worker, args) if workers > 1 else None
    local = None if pool else dict(tokenizer=tok, fmt=fmt, template=template,
                                   max_tokens=max_tokens, overlong=overlong)
    stats = FinetuneDataStats()
    bar = tqdm(unit=" records", desc="finetune-data", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    start = time.perf_counter()
    skipped_path = output_prefix + ".skipped.txt"
    tmp_skipped = f"{skipped_path}.tmp{os.getpid()}"
    try:
        with IndexedDatasetWriter(output_prefix, token_dtype(tok.vocab_size)) as writer, \
                IndexedDatasetWriter(output_prefix + MASK_SUFFIX, np.uint8) as mask_writer, \
                open(tmp_skipped, "w", encoding="utf-8") as skipped:
            for path in inputs:
                pending: collections.deque = collections.deque()

                def drain(block: bool) -> None:
                    while pending and (block or pending[0][0].ready()
                                       or len(pending) >= 2 * workers):
                        result, count = pending.popleft()
                        flat, flat_mask, lengths, bad, truncated, dropped = result.get()
                        offset = 0
                        for n in lengths.tolist():
                            writer.add_document(flat[offset:offset + n])
                            mask_writer.add_document(flat_mask[offset:offset + n])
                            offset += n
                        stats.response_tokens += int(flat_mask.sum())
                        stats.truncated += truncated
                        stats.dropped_overlong += dropped
                        for where, reason in bad:
                            record = BadRecord(path, where, reason)  # type: ignore[arg-type]
                            stats.bad[record.category] += 1
                            if len(stats.bad_examples) < show_bad:
                                stats.bad_examples.append(record)
                            skipped.write(f"{record}\n")
                        bar.update(count)

                batch: list = []
                for item in _records(path):
                    batch.append(item)
                    if len(batch) == BATCH_RECORDS:
                        pending.append((_submit(pool, batch, local), len(batch)))
                        batch = []
                        drain(block=False)
                if batch:
                    pending.append((_submit(pool, batch, local), len(batch)))
                drain(block=True)
            mask_writer.finalize()  # the token pair last: it marks the dataset complete
            writer.finalize()
            stats.examples, stats.tokens = writer.documents, writer.tokens
        if stats.bad_total:
            os.replace(tmp_skipped, skipped_path)
        else:
            os.unlink(tmp_skipped)
    finally:
        if os.path.exists(tmp_skipped):
            os.unlink(tmp_skipped)
        if pool is not None:
            pool.terminate()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


class _Done:
    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


def _submit(pool, batch, local):
    if pool is None:
        return _Done(encode_records(batch, local))
    return pool.apply_async(encode_records, (batch,))
