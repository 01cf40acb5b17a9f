"""Tensor files written and read one tensor at a time, so conversion memory stays small.

- `TorchFileWriter` writes PyTorch's zip format (what ``torch.save`` of a dict of tensors
  writes and ``torch.load(weights_only=True)`` reads): the pickle describing every tensor is
  written first from shapes alone, then each tensor's bytes as it is produced.
- `SafetensorsWriter` / `SafetensorsFile` write and read the safetensors format (an 8-byte
  header length, a JSON header with dtype/shape/byte offsets, then raw little-endian bytes)
  with plain file I/O: no memory map whose touched pages would add up to the whole file.
- `release_pages` drops a memory-mapped tensor's pages from this process's resident set once
  it has been used (they stay in the page cache; touching them again re-reads them). Without
  it, reading a 13 GB memory-mapped checkpoint end to end leaves 13 GB resident.
"""

from __future__ import annotations

import collections
import ctypes
import io
import json
import mmap
import os
import pickle
import struct
from typing import Iterable, Optional

import torch

STORAGE_TYPES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage",
                 torch.bfloat16: "BFloat16Storage"}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
DTYPES_BY_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MADV_DONTNEED = 4
_libc = None


def release_pages(tensor: torch.Tensor) -> None:
    """Advise the kernel that a memory-mapped tensor's pages are no longer needed here.

    Safe for any CPU tensor whose bytes come from a read-only file mapping (e.g.
    ``torch.load(mmap=True)``): the data stays valid and is re-read from the page cache if
    used again. Does nothing on platforms without ``madvise``.
    """
    global _libc
    if tensor.device.type != "cpu" or tensor.numel() == 0 or os.name != "posix":
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    # Only whole pages strictly inside the tensor: neighbours' pages are left alone.
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


# ---- PyTorch's zip format, streamed ---------------------------------------------------------
class _StorageRef:
    """Stands for a tensor's storage in the pickle; `persistent_id` turns it into a record."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor of the given shape, without any data."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, step = [], 1
        for n in reversed(self.shape):
            stride.append(step)
            step *= n
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), tuple(reversed(stride)), False,
                 collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, STORAGE_TYPES[obj.dtype]), obj.key, "cpu",
                    obj.numel)
        return None


class TorchFileWriter:
    """Write ``{name: tensor}`` in ``torch.save``'s format, one tensor at a time.

    ``layout`` lists every (name, shape, dtype) up front, in order; then `write` must be
    called for each name in that order. `close` finishes the file; a file that was not closed
    is not a valid archive (callers write into a temporary directory).
    """

    def __init__(self, path: str, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]]):
        self.layout = [(n, tuple(s), d) for n, s, d in layout]
        self._next = 0
        refs = {}
        for i, (name, shape, dtype) in enumerate(self.layout):
            numel = 1
            for n in shape:
                numel *= n
            refs[name] = _TensorRef(_StorageRef(str(i), dtype, numel), shape)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(refs)
        self._writer = torch._C.PyTorchFileWriter(path)
        data = buf.getvalue()
        self._writer.write_record("data.pkl", data, len(data))
        self._writer.write_record("byteorder", "little", len("little"))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (its name, shape and dtype must match the layout)."""
        want, shape, dtype = self.layout[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected {want} {shape} {dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        if tensor.storage_offset() or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        self._writer.write_record(f"data/{self._next}", storage, tensor.nbytes)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.layout):
            raise ValueError(f"{len(self.layout) - self._next} tensor(s) were never written")
        self._writer.write_end_of_file()


# ---- safetensors ----------------------------------------------------------------------------
class SafetensorsWriter:
    """Write a .safetensors file one tensor at a time; the header is known from the layout."""

    def __init__(self, path: str, layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Optional[dict[str, str]] = None):
        self.layout = [(n, tuple(s), d) for n, s, d in layout]
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.layout:
            numel = 1
            for n in shape:
                numel *= n
            size = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, shape, dtype = self.layout[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected {want} {shape} {dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(flat.numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.layout):
            raise ValueError(f"{len(self.layout) - self._next} tensor(s) were never written")


class SafetensorsFile:
    """A .safetensors file's header, and its tensors read on demand with plain reads."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(f.read(length))
        self.data_start = 8 + length
        header.pop("__metadata__", None)
        self.entries = {}
        for name, info in header.items():
            dtype = DTYPES_BY_SAFETENSORS.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            if self.data_start + end > size:
                raise ValueError(f"{name}: data ends at byte {self.data_start + end}, the file "
                                 f"has {size} (truncated?)")
            self.entries[name] = (dtype, tuple(info["shape"]), begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        dtype, shape, begin, end = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(view) != end - begin:
                    raise ValueError(f"{name}: file ends early (truncated?)")
        return out
