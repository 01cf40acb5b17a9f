"""Spawn N local processes (gloo on CPU) that run one function each, with a hard timeout.

Used by `megatron-llama selfcheck` and the multi-process tests. Collectives hang rather than
fail when one rank dies, so every launch has a deadline after which all ranks are killed and
the caller gets each rank's error. Importing megatron-core costs seconds per process: put
many checks in one launched function.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, workdir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world, workdir, *args)
        torch.save(result, Path(workdir) / f"result{rank}.pt")
    except BaseException:  # noqa: BLE001 - report everything to the parent
        (Path(workdir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


class LaunchError(RuntimeError):
    """A spawned rank failed or the group missed its deadline."""


def run_processes(fn: Callable, world: int, workdir: str, *args: Any,
                  timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world, workdir, *args)`` in ``world`` spawned processes.

    ``fn`` must be importable (module level). Returns each rank's return value (torch-saved).
    """
    import torch

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, workdir, args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    deadline_hit = any(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [(Path(workdir) / f"error{r}.txt") for r in range(world)]
    messages = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists()]
    if messages:
        raise LaunchError("worker failed\n" + "\n".join(messages))
    if deadline_hit:
        raise LaunchError(f"workers did not finish within {timeout:.0f} s (hung collective?)")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise LaunchError(f"workers exited abnormally: {bad}")
    return [torch.load(Path(workdir) / f"result{r}.pt", weights_only=True) for r in range(world)]
