"""Process-wide tuning of the host that has nothing to do with megatron-core.

`tune_process()` is called once per training / benchmark / conversion process by
`parallel.initialize`. Today it does one thing, on CPU-only Linux hosts with glibc:

glibc's malloc is told to keep freed memory (`keep_freed_cpu_memory`). By default every
allocation above 32 MB (the logits [s, b, vocab] and their gradient, the embedding and
output-layer weight gradients) is a fresh ``mmap`` that the kernel page-faults and zeroes on
first touch and ``munmap``s on free, step after step. At dim 512 / vocab 32000 / 2048 tokens
that cost ~60 ms per 262 MB logits tensor (the output GEMM ran at 80 % of the GEMM rate
because of it). Numerics are untouched; freed memory stays in the process, as it does with
torch's CUDA caching allocator on GPUs. Opt out with ``MEGATRON_LLAMA_KEEP_FREED_MEMORY=0``.

On CUDA hosts nothing is changed (host memory is not on the step's critical path there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

KEEP_FREED_MEMORY_ENV = "MEGATRON_LLAMA_KEEP_FREED_MEMORY"

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_malloc_tuned = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of mmap/munmap for large blocks.

    ``M_MMAP_MAX = 0``: large blocks come from the heap, so a block freed by one step is
    handed out again (already faulted in) in the next; ``M_TRIM_THRESHOLD`` = 2 GiB (the int
    maximum): the heap top is not given back to the kernel after each step. Only on glibc;
    returns True if set. Idempotent; ``MEGATRON_LLAMA_KEEP_FREED_MEMORY=0`` disables it.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return False  # musl and others: no glibc mallopt semantics
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except OSError:
        return False
    _malloc_tuned = ok
    return ok


def tune_process() -> dict[str, bool]:
    """Apply the host tuning above (idempotent); returns what is in effect."""
    import torch

    if torch.cuda.is_available():
        return {"keep_freed_cpu_memory": False}
    return {"keep_freed_cpu_memory": keep_freed_cpu_memory()}
