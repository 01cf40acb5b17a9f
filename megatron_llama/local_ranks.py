"""Local ranks: N processes on this host that rendezvous on 127.0.0.1.

- `run_processes` runs one Python function per rank with a hard deadline (selfcheck, the
  benchmark, the multi-process tests). Collectives hang rather than fail when one rank dies,
  so every launch has a deadline after which all ranks are killed and the caller gets each
  rank's error. Importing megatron-core costs seconds per process: put many checks in one
  launched function.
- `run_cli_ranks` runs a `megatron-llama` command on N ranks (``pretrain --nproc-per-node``,
  ``generate --tp``) the way a user wants to see it: a one-line error is printed once, not
  once per rank; when a rank fails, the others are stopped and their follow-on errors are
  not shown; SIGINT / SIGTERM / SIGUSR1 are forwarded to every rank (so Ctrl-C saves a
  checkpoint), a second Ctrl-C kills them; the ranks die with this process (no orphans).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_llama.errors import HANG_EXIT_CODE


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


# ---- the CLI on local ranks -----------------------------------------------------------------
ONE_LINE_ERROR = re.compile(rb"^megatron-llama [\w-]+: (error|interrupted)\b")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def under_launcher() -> bool:
    """True when torchrun, srun or `run_cli_ranks` started this process (it has a rank)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _die_with_parent() -> None:
    """In a rank, before exec: get SIGTERM when the launcher dies (Linux), so no rank
    outlives it; SIGTERM makes a training rank save a checkpoint and exit."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Relay(threading.Thread):
    """Copies one rank's stderr to ours, segment by segment (``\n`` or ``\r``: progress
    bars stay live), except one-line errors already shown and anything after another rank
    failed first."""

    def __init__(self, rank: int, proc: subprocess.Popen, group: "_RankGroup"):
        super().__init__(daemon=True)
        self.rank, self.stream, self.group = rank, proc.stderr, group
        self.proc = proc
        self.printed_error = False

    def run(self) -> None:
        try:
            self._copy()
        finally:
            # end of its stderr: the rank has exited (or closed it); a failure is known now,
            # before the other ranks' follow-on errors arrive
            self.group.exited(self.rank, self.proc.wait())

    def _copy(self) -> None:
        pending = b""
        fd = self.stream.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            while True:
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
                if cut < 0:
                    break
                head, pending = pending[:cut + 1], pending[cut + 1:]
                for segment in re.split(rb"(?<=[\n\r])", head):
                    if segment:
                        self.group.emit(self, segment)
        if pending:
            self.group.emit(self, pending + b"\n")


class _RankGroup:
    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.lock = threading.Lock()
        self.errors_shown: set[bytes] = set()
        self.first_failure: Optional[int] = None
        self.hidden_after_failure = True  # follow-on errors of the other ranks
        self.interrupts = 0

    def expected_exit(self, code: int) -> bool:
        """0, or 130 after Ctrl-C was forwarded (the rank saved and stopped as asked)."""
        return code == 0 or (self.interrupts > 0 and code == 130)

    def exited(self, rank: int, code: int) -> None:
        with self.lock:
            if self.first_failure is None and not self.expected_exit(code):
                self.first_failure = rank
                # a hang: every stuck rank prints its own stacks, all of them are wanted
                self.hidden_after_failure = code != HANG_EXIT_CODE

    def emit(self, relay: _Relay, segment: bytes) -> None:
        with self.lock:
            if (self.first_failure is not None and relay.rank != self.first_failure
                    and self.hidden_after_failure):
                return  # follow-on errors of the other ranks
            if ONE_LINE_ERROR.match(segment):
                relay.printed_error = True
                if segment in self.errors_shown:
                    return
                self.errors_shown.add(segment)
            sys.stderr.buffer.write(segment)
            sys.stderr.buffer.flush()

    def forward(self, signum: int, frame=None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL if self.interrupts > 1 else signum)
                except ProcessLookupError:
                    pass

    def stop_all(self, grace_s: float) -> None:
        """SIGTERM the ranks still running, SIGKILL them after ``grace_s``."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs if p.poll() is None]
            for p in alive:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            for p in alive:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass


def run_cli_ranks(nproc: int, argv: list[str], *, drop_flag: Optional[str] = "--nproc-per-node",
                  failure_grace_s: float = 5.0) -> int:
    """Run ``megatron-llama ARGV`` on ``nproc`` local ranks and return its exit code.

    Each rank gets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR /
    MASTER_PORT as torchrun would set them, and OMP_NUM_THREADS = cores / ranks unless set.
    When a rank fails, the others get ``failure_grace_s`` to finish on their own, then are
    stopped; the exit code is the first failed rank's."""
    args = _without_flag(argv, drop_flag) if drop_flag else list(argv)
    port = free_port()
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   OMP_NUM_THREADS=threads,
                   PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_llama.cli", *args],
                                      env=env, stderr=subprocess.PIPE, start_new_session=True,
                                      preexec_fn=_die_with_parent))
    group = _RankGroup(procs)
    relays = [_Relay(r, p, group) for r, p in enumerate(procs)]
    for relay in relays:
        relay.start()
    previous = {s: signal.signal(s, group.forward) for s in FORWARDED_SIGNALS}
    try:
        while any(p.poll() is None for p in procs):
            if group.first_failure is not None:
                # the others get a moment to finish on their own, then are stopped: they
                # are most likely waiting in a collective for the rank that is gone
                deadline = time.monotonic() + failure_grace_s
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                group.stop_all(failure_grace_s)
                break
            time.sleep(0.05)
        for relay in relays:
            relay.join(5.0)
        if group.first_failure is None:  # a rank may have failed in the last instant
            for rank, p in enumerate(procs):
                group.exited(rank, p.wait())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if any(p.poll() is None for p in procs):  # interrupted while waiting: no orphans
            group.stop_all(0.0)
    if group.first_failure is None:
        return 130 if any(p.returncode == 130 for p in procs) else 0
    rank = group.first_failure
    code = procs[rank].returncode
    command = args[0] if args else "command"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        print(f"megatron-llama {command}: error: rank {rank} was killed by {name}{hint}",
              file=sys.stderr, flush=True)
        return 128 - code
    if code == HANG_EXIT_CODE:
        print(f"megatron-llama {command}: error: rank {rank} hung (no progress within "
              "--hang-timeout; the stacks of the stuck ranks are above)", file=sys.stderr,
              flush=True)
    elif not relays[rank].printed_error:
        print(f"megatron-llama {command}: error: rank {rank} failed with exit code {code} "
              "(its output is above)", file=sys.stderr, flush=True)
    return code
