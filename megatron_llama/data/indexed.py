"""A streaming writer for megatron-core's indexed dataset (.bin + .idx), atomic on success.

megatron-core's own ``IndexedDatasetBuilder`` keeps every document length in Python lists
until the end (memory grows with the corpus). This writer spools lengths to a temporary
file and writes the index in fixed-size chunks, so memory stays constant however large the
input. The files use megatron-core's format (read back with
``megatron.core.datasets.indexed_dataset.IndexedDataset``): one sequence per document.

Index layout: b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q sequence count,
<Q document count + 1, int32 lengths, int64 byte offsets, int64 document indices.
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Optional

import numpy as np

from megatron_llama.fileio import respect_umask

_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}
_CHUNK = 1 << 20  # index entries processed per chunk


class IndexedDatasetWriter:
    """Write documents to ``<prefix>.bin``/``.idx``; files appear only after `finalize`.

    Use as a context manager: on an exception, the temporary files are removed and nothing
    is left at ``prefix``.
    """

    def __init__(self, prefix: str, dtype=np.uint16):
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.prefix = prefix
        self.dtype = dtype
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(prefix)
        self._tmp_bin = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{base}.", suffix=".bin.tmp",
                                                    delete=False)
        self._tmp_len = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{base}.", suffix=".len.tmp",
                                                    delete=False)
        self._tmp_idx: Optional[str] = None
        self.documents = 0
        self.tokens = 0

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._tmp_bin.write(arr.tobytes(order="C"))
        self._tmp_len.write(np.int32(arr.size).tobytes())
        self.documents += 1
        self.tokens += arr.size

    def finalize(self) -> None:
        """Write the index, then move .bin and .idx into place (the .idx last)."""
        self._tmp_bin.close()
        self._tmp_len.close()
        n = self.documents
        itemsize = np.dtype(self.dtype).itemsize
        self._tmp_idx = self._tmp_bin.name[: -len(".bin.tmp")] + ".idx.tmp"
        lengths = np.memmap(self._tmp_len.name, dtype=np.int32, mode="r", shape=(n,)) if n else \
            np.zeros(0, dtype=np.int32)
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            for start in range(0, n, _CHUNK):
                f.write(np.ascontiguousarray(lengths[start:start + _CHUNK]).tobytes())
            offset = 0
            for start in range(0, n, _CHUNK):
                chunk = lengths[start:start + _CHUNK].astype(np.int64) * itemsize
                pointers = np.cumsum(chunk) - chunk + offset
                offset += int(chunk.sum())
                f.write(pointers.tobytes())
            for start in range(0, n + 1, _CHUNK):
                f.write(np.arange(start, min(n + 1, start + _CHUNK), dtype=np.int64).tobytes())
        del lengths
        # Drop an old index first: a reader then sees either no dataset or the new pair.
        if os.path.exists(self.prefix + ".idx"):
            os.unlink(self.prefix + ".idx")
        respect_umask(self._tmp_bin.name)  # NamedTemporaryFile made it 0600
        os.replace(self._tmp_bin.name, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")
        os.unlink(self._tmp_len.name)

    def abort(self) -> None:
        for handle in (self._tmp_bin, self._tmp_len):
            handle.close()
        for path in (self._tmp_bin.name, self._tmp_len.name, self._tmp_idx):
            if path and os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


_DTYPES_BY_CODE = {code: np.dtype(t) for t, code in _DTYPE_CODES.items()}
_HEADER_BYTES = len(_HEADER) + 8 + 1 + 8 + 8


def check_pair(prefix: str) -> int:
    """Check that ``<prefix>.idx`` and ``<prefix>.bin`` belong together; return the number
    of documents.

    Reads only the header and the last index entries: the index must have the size its
    header implies, its pointers must fit the .bin of the header's dtype exactly, and the
    document index must end at the sequence count. A truncated or mismatched pair (a copy
    cut short, the .bin of another run) raises ValueError naming the file and the problem,
    before megatron-core's dataset reads past an end.
    """
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as f:
        header = f.read(_HEADER_BYTES)
        if not header.startswith(_HEADER) or len(header) < _HEADER_BYTES:
            raise ValueError(f"{idx}: not a megatron-core index file")
        version, code, sequences, documents_plus_one = struct.unpack("<QBQQ", header[len(_HEADER):])
        if version != 1 or code not in _DTYPES_BY_CODE or documents_plus_one < 1:
            raise ValueError(f"{idx}: unsupported index (version {version}, dtype code {code})")
        expected = _HEADER_BYTES + sequences * (4 + 8) + documents_plus_one * 8
        size = os.fstat(f.fileno()).st_size
        if size != expected:
            raise ValueError(f"{idx}: {size:,} bytes, but its header ({sequences:,} sequences, "
                             f"{documents_plus_one - 1:,} documents) implies {expected:,}: "
                             "truncated or damaged; run `megatron-llama preprocess` again")
        itemsize = _DTYPES_BY_CODE[code].itemsize
        end = 0
        if sequences:
            f.seek(_HEADER_BYTES + (sequences - 1) * 4)
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_HEADER_BYTES + sequences * 4 + (sequences - 1) * 8)
            (last_pointer,) = struct.unpack("<q", f.read(8))
            end = last_pointer + last_length * itemsize
        f.seek(size - 8)
        (last_document,) = struct.unpack("<q", f.read(8))
    if last_document != sequences:
        raise ValueError(f"{idx}: its document index ends at {last_document}, not at its "
                         f"{sequences} sequences: damaged; run `megatron-llama preprocess` again")
    bin_size = os.path.getsize(bin_path)
    if bin_size != end:
        what = "truncated" if bin_size < end else "longer than its index"
        raise ValueError(f"{bin_path}: {bin_size:,} bytes, but {idx} indexes {end:,} bytes of "
                         f"{_DTYPES_BY_CODE[code].name} tokens ({what}: the pair does not "
                         "belong together; run `megatron-llama preprocess` again)")
    return documents_plus_one - 1


def document_count(prefix: str) -> int:
    """Number of documents in ``<prefix>.idx``, read from its header."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(_HEADER) + 8 + 1 + 8 + 8)
    if not header.startswith(_HEADER) or len(header) < len(_HEADER) + 25:
        raise ValueError(f"{prefix}.idx: not a megatron-core index file")
    (documents_plus_one,) = struct.unpack("<Q", header[-8:])
    return documents_plus_one - 1
