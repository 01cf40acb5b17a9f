"""Per-rank watchdog: hang detection and dying with the launcher.

A rank that waits forever in a collective (a peer died without closing its sockets, a
deadlocked data worker, a stuck filesystem) costs a 2048-GPU job its whole allocation. The
watchdog thread of each rank expects a `beat` at every step; when none comes within the
limit it prints a one-line reason (rank, step, phase, limit) and the Python stack of every
thread (faulthandler), waits a few seconds so that every other stuck rank prints its own,
and exits with `HANG_EXIT_CODE`, so the launcher ends the job and Slurm requeues it.

Limits: ``--hang-timeout S`` for a training step (0 disables the watchdog); by default
``max(MIN_STEP_LIMIT_S, STEP_FACTOR x the slowest step so far)``. Long phases (start-up and
the first step, loading, saving, evaluation) get ``max(step limit, LONG_PHASE_S)``: a save
of a large model takes minutes and makes no step progress.

The same thread watches the parent process: when the launcher (torchrun, our
``--nproc-per-node`` launcher) dies, the rank is re-parented, and within a second the thread
sends it SIGTERM, which makes it save after the current step and exit, so no rank trains on
as an orphan. (Our own launcher also sets Linux's parent-death signal,
`local_ranks._die_with_parent`.)
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

from megatron_llama.errors import HANG_EXIT_CODE

MIN_STEP_LIMIT_S = 300.0
STEP_FACTOR = 20.0
LONG_PHASE_S = 1800.0
REPORT_GRACE_S = 5.0  # after printing: time for the other stuck ranks to print theirs
# Fault injection: "STEP" or "STEP:RANK": that rank (every rank without :RANK) stops forever
# at the start of step STEP, as a rank stuck in a collective does.
HANG_TEST_ENV = "MEGATRON_LLAMA_TEST_HANG_AT"


class Watchdog:
    """One rank's watchdog thread (see the module doc); `start` it, `beat`, `stop`."""

    def __init__(self, rank: int, hang_timeout: Optional[float] = None,
                 command: str = "pretrain", watch_parent: bool = True):
        self.rank, self.command = rank, command
        self.fixed = hang_timeout  # None: derived from step times; 0: disabled
        self.slowest = 0.0
        self.step, self.phase = 0, "start-up"
        self.long_phase = True
        self.last = time.monotonic()
        self.parent = os.getppid() if watch_parent else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="megatron-llama-watchdog")

    @property
    def enabled(self) -> bool:
        return self.fixed != 0

    def step_limit(self) -> float:
        if self.fixed:
            return float(self.fixed)
        return max(MIN_STEP_LIMIT_S, STEP_FACTOR * self.slowest)

    def limit(self) -> float:
        step = self.step_limit()
        return max(step, LONG_PHASE_S) if self.long_phase else step

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def beat(self, step: int, step_time: Optional[float] = None) -> None:
        """Progress: step ``step`` is done (it took ``step_time`` seconds)."""
        if step_time is not None and step > 1:  # the first step includes warm-up
            self.slowest = max(self.slowest, step_time)
        self.step, self.phase, self.long_phase = step, "training", False
        self.last = time.monotonic()

    @contextlib.contextmanager
    def long(self, phase: str) -> Iterator[None]:
        """A phase that may take minutes without a step (a save, a load, an evaluation)."""
        previous = (self.phase, self.long_phase)
        self.phase, self.long_phase, self.last = phase, True, time.monotonic()
        try:
            yield
        finally:
            (self.phase, self.long_phase), self.last = previous, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            if self.parent not in (None, 1) and os.getppid() != self.parent:
                self.parent = None  # once: the launcher is gone, save and stop
                os.kill(os.getpid(), signal.SIGTERM)
            if not self.enabled:
                continue
            waited, limit = time.monotonic() - self.last, self.limit()
            if waited > limit:
                self._report(waited, limit)

    def _report(self, waited: float, limit: float) -> None:
        where = (f"in {self.phase}" if self.phase != "training"
                 else f"after step {self.step}, in step {self.step + 1}")
        print(f"megatron-llama {self.command}: error: rank {self.rank} made no progress for "
              f"{waited:.0f} s {where} (limit {limit:.0f} s, --hang-timeout); the Python "
              f"stack of each of its threads follows, then it exits {HANG_EXIT_CODE}",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        time.sleep(REPORT_GRACE_S)
        os._exit(HANG_EXIT_CODE)


def injected_hang(step: int, rank: int) -> None:
    """Fault injection (`HANG_TEST_ENV`): block forever at the start of that step."""
    value = os.environ.get(HANG_TEST_ENV, "")
    if not value:
        return
    at, _, who = value.partition(":")
    if int(at) == step and (not who or int(who) == rank):
        while True:
            time.sleep(3600)
