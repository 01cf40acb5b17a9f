"""Text/JSONL in, megatron-core indexed dataset out: parallel, streaming, atomic, accounted.

The main process reads raw lines and hands batches of ~1 MB to worker processes, which
decode, parse and tokenize them (EOS after every document) and send back one token array
per batch. At most ``2 x workers`` batches are in flight, and the writer streams to disk,
so memory does not depend on the input size. Batches are written in input order, so the
dataset is deterministic whatever the worker count. Bad records are skipped, counted by
reason and listed with file and line (the first few on the console, all of them in
``<prefix>.skipped.txt``); every good document is kept.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_llama.data.indexed import IndexedDatasetWriter
from megatron_llama.data.sources import BadRecord, LineReader, check_inputs, input_kind
from megatron_llama.data.tokenizer import Tokenizer, token_dtype
from megatron_llama.errors import ConfigError

BATCH_BYTES = 1 << 20

_worker_tokenizer = None


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    bad: collections.Counter = field(default_factory=collections.Counter)
    bad_examples: list = field(default_factory=list)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        rate = self.documents / max(self.seconds, 1e-9)
        trate = self.tokens / max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
                f"({rate:,.0f} docs/s, {trate:,.0f} tokens/s); skipped {self.bad_total:,} bad "
                f"record(s)" + (": " + ", ".join(f"{r} {n}" for r, n in self.bad.most_common())
                                if self.bad else ""))


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once
    _worker_tokenizer = Tokenizer(model_path)


def encode_batch(kind: str, text_key: str, add_bos: bool, lines: list[tuple[int, bytes]],
                 tokenizer: Optional[Tokenizer] = None):
    """Parse and tokenize one batch of raw lines.

    Returns (tokens of all good documents concatenated, their lengths, [(line, reason)]).
    """
    from megatron_llama.data.sources import parse_record

    tok = tokenizer or _worker_tokenizer
    texts, bad = [], []
    for number, raw in lines:
        text, reason = parse_record(raw, kind, text_key)
        if text is None:
            bad.append((number, reason))
        else:
            texts.append(text)
    ids = tok.encode_batch(texts) if texts else []
    # [bos] + ids + [eos] per document, assembled in numpy: the batch's ids are converted in
    # one C-level pass (fast tokenizers leave per-token Python work as the bottleneck)
    dtype = token_dtype(tok.vocab_size)
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                       count=sum(map(len, ids)))
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1 + add_bos
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    keep = np.ones(flat.shape[0], dtype=bool)
    keep[ends - 1] = False
    flat[ends - 1] = tok.eos_id
    if add_bos:
        keep[ends - lengths] = False
        flat[ends - lengths] = tok.bos_id
    flat[keep] = body
    return flat, lengths.astype(np.int32), bad


def _batches(reader: LineReader, kind: str, txt_documents: str):
    """Yield (records, on-disk position after them) in batches of about BATCH_BYTES."""
    lines, size = [], 0
    for number, raw in reader.records(kind, txt_documents):
        lines.append((number, raw))
        size += len(raw) + 1
        if size >= BATCH_BYTES:
            yield lines, reader.position
            lines, size = [], 0
    if lines:
        yield lines, reader.position


def check_output_prefix(prefix: str) -> None:
    """A prefix names files: ``data/`` or an existing directory is refused (it would write
    hidden ``data/.bin``)."""
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix) \
            or not os.path.basename(prefix):
        example = os.path.join(prefix.rstrip("/" + os.sep) or ".", "mydata")
        raise ConfigError(f"{prefix}: is a directory; --output-prefix names the dataset files, "
                          f"e.g. {example} (writes {example}.bin and .idx)")


def preprocess(inputs: list[str], output_prefix: str, tokenizer_model: str, *,
               workers: int = 1, text_key: str = "text", add_bos: bool = False,
               progress: bool = True, show_bad: int = 10,
               txt_documents: str = "line") -> PreprocessStats:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (see module docstring).

    ``txt_documents``: how .txt inputs are cut into documents (`sources.TXT_DOCUMENTS`)."""
    import multiprocessing as mp

    from tqdm import tqdm

    check_output_prefix(output_prefix)
    check_inputs(inputs)
    tokenizer = Tokenizer(tokenizer_model)
    stats = PreprocessStats(bytes=sum(os.path.getsize(p) for p in inputs))
    bar = tqdm(total=stats.bytes, unit="B", unit_scale=True, desc="preprocess",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    # fork where the OS has it: workers start fast and callers need no __main__ guard.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = (context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_model,))
            if workers > 1 else None)
    start = time.perf_counter()
    try:
        with IndexedDatasetWriter(output_prefix, token_dtype(tokenizer.vocab_size)) as writer, \
                _BadReport(output_prefix, stats, show_bad) as report:
            for path in inputs:
                kind = input_kind(path)
                pending: collections.deque = collections.deque()
                done = 0  # on-disk bytes of this file already counted in the bar

                def drain(block: bool) -> None:
                    nonlocal done
                    while pending and (block or pending[0][0].ready()
                                       or len(pending) >= 2 * workers):
                        result, position = pending.popleft()
                        flat, lengths, bad = result.get()
                        _write(writer, flat, lengths)
                        for number, reason in bad:
                            report.add(BadRecord(path, number, reason))
                        bar.update(position - done)
                        done = position
                        _postfix(bar, writer, start)

                with LineReader(path) as reader:
                    for lines, position in _batches(reader, kind, txt_documents):
                        if pool is None:
                            result = _Done(encode_batch(kind, text_key, add_bos, lines, tokenizer))
                        else:
                            result = pool.apply_async(encode_batch, (kind, text_key, add_bos, lines))
                        pending.append((result, position))
                        drain(block=False)
                    drain(block=True)
            writer.finalize()
            report.finalize()
            stats.documents, stats.tokens = writer.documents, writer.tokens
    except KeyboardInterrupt:
        if pool is not None:
            # Let the batches in flight (at most 2 x workers, ~1 MB each) finish: terminate()
            # can kill a worker while it holds the pool's queue lock, and then hangs forever.
            pool.close()
            pool.join()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


class _BadReport:
    """Counts bad records, keeps the first few, streams all to <prefix>.skipped.txt."""

    def __init__(self, prefix: str, stats: PreprocessStats, keep: int):
        self.path = prefix + ".skipped.txt"
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        self.stats, self.keep = stats, keep
        self.file = open(self.tmp, "w", encoding="utf-8")

    def add(self, record: BadRecord) -> None:
        self.stats.bad[record.category] += 1
        if len(self.stats.bad_examples) < self.keep:
            self.stats.bad_examples.append(record)
        self.file.write(f"{record}\n")

    def finalize(self) -> None:
        self.file.close()
        if self.stats.bad_total:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
            if os.path.exists(self.path):
                os.unlink(self.path)  # a stale report of an earlier run

    def __enter__(self) -> "_BadReport":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class _Done:
    """A finished result with the AsyncResult interface (the in-process path)."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


def _write(writer: IndexedDatasetWriter, flat: np.ndarray, lengths: np.ndarray) -> None:
    offset = 0
    for n in lengths.tolist():
        writer.add_document(flat[offset:offset + n])
        offset += n


def _postfix(bar, writer: IndexedDatasetWriter, start: float) -> None:
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix_str(f"{writer.documents / elapsed:,.0f} docs/s, "
                        f"{writer.tokens / elapsed:,.0f} tokens/s", refresh=False)
