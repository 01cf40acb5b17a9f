"""Peak memory of a training step on CPU (and GPU), measured honestly.

Two numbers per rank, because they answer different questions:

- **peak tensor memory** (what `planner.memory_per_gpu` predicts): bytes of live tensors at
  the worst moment of a step. Static part = every distinct storage reachable from the model,
  its DDP grad buffers and the optimizer state, summed once each (`static_tensor_bytes`).
  Dynamic part = the peak of (allocations - frees) during one training step, read from
  torch's CPU allocator through the profiler's allocation events (`profile_memory=True`).
  The profiler slows the step down, so this is an extra step outside the timed ones.
  On a GPU, ``torch.cuda.max_memory_allocated`` is the same quantity and is used instead.
- **peak RSS** (``VmHWM`` from /proc, i.e. ``getrusage`` max RSS): what the operating system
  charged the process at its worst, including the Python interpreter, torch and megatron-core
  code (~0.4-0.6 GB here), glibc's cached free memory and the start-up's temporaries.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import Callable, Iterable, Iterator


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (torch 2.13's profiler prints a 'USDT: ...
    profiler_start/stop' line from C++ at each start and stop, with no switch to turn it off)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profiled(step: Callable[[], object], **profile_kwargs):
    """Run ``step()`` under torch's CPU profiler and return the profiler.

    Only the profiler's start and stop are silenced: anything ``step`` prints, errors
    included, still reaches stderr.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], **profile_kwargs)
    with _stderr_silenced():
        prof.start()
    try:
        step()
    finally:
        with _stderr_silenced():
            prof.stop()
    return prof


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensors_of(obj, out: list) -> None:
    """Collect tensors from nested dicts/lists/tuples (optimizer state)."""
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_of(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_of(v, out)


def static_tensor_bytes(chunks: Iterable, optimizer=None) -> int:
    """Bytes of distinct storages held between steps: weights, grad buffers, optimizer state.

    Parameters of megatron-core's DDP are views into its contiguous buffers and the
    distributed optimizer's fp32 shards can be views too, so storages are de-duplicated.
    """
    tensors: list = []
    for chunk in chunks:
        for p in chunk.parameters():
            tensors.append(p)
            for attr in ("main_grad", "grad"):
                g = getattr(p, attr, None)
                if g is not None:
                    tensors.append(g)
        for buf in getattr(chunk, "buffers", []) or []:  # DDP's _ParamAndGradBuffer list
            for attr in ("param_data", "grad_data"):
                t = getattr(buf, attr, None)
                if t is not None:
                    tensors.append(t)
    if optimizer is not None:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            inner = getattr(opt, "optimizer", opt)
            _tensors_of(list(inner.state.values()), tensors)
            for group in inner.param_groups:
                _tensors_of(group["params"], tensors)
            for attr in ("shard_fp32_from_float16_groups", "shard_fp32_groups"):
                _tensors_of(getattr(opt, attr, []), tensors)
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of (allocated - freed) bytes while ``step()`` runs, from torch's allocator events."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    from torch._C._profiler import _EventType

    prof = profiled(step, profile_memory=True)
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    current = peak = 0
    for _, size in events:  # size < 0 for frees (frees of older tensors lower the level)
        current += size
        peak = max(peak, current)
    return peak
