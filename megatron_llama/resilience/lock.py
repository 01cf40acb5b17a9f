"""One writer per checkpoint directory: ``<save>/.megatron-llama.lock``.

Two runs writing the same ``--save`` destroy each other's checkpoints (found by restarting a
run while its orphaned ranks still trained). Rank 0 of a run holds this lock for the run's
lifetime; a second run is refused with one line naming the holder.

How it stays correct on the filesystems clusters use:

- The lock file is created with ``O_CREAT | O_EXCL``, which is atomic on local disks, NFSv3+,
  Lustre and GPFS: of two runs starting at once, exactly one creates it. It records the
  holder's host, pid, process start time and a random token.
- The holder also takes an ``flock`` on it, which the kernel releases when the process dies,
  however it dies. Where flock is coherent across hosts (local disks; NFSv4; Lustre mounted
  with ``-o flock``; GPFS) a held flock proves a live holder.
- Where it is not (Lustre ``localflock``/``noflock``, NFS mounted ``nolock``), a heartbeat
  decides for holders on other hosts: the holder refreshes the file's mtime every
  `HEARTBEAT_S`; a lock from another host whose heartbeat is older than `STALE_AFTER_S` is
  stale. A holder on this host is alive exactly when its pid runs with the recorded start
  time (pid reuse is not mistaken for the holder).
- A stale lock is renamed aside (atomic: of two runs taking it over, one rename wins), then
  a fresh lock is created as above.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import threading
import time
from typing import Optional

from megatron_llama.errors import ConfigError

LOCK_FILE = ".megatron-llama.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _process_start(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _try_flock(fd: int) -> Optional[bool]:
    """True: we hold the flock; False: someone else does; None: no flock on this filesystem."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def describe_holder(holder: dict) -> str:
    """``host h, pid 12, started 2026-12-02 17:50:01``."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"


class RunLock:
    """The lock of one directory; `acquire` it, `release` it (or let the process die)."""

    def __init__(self, directory: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.fd: Optional[int] = None
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- reading the current state --------------------------------------------------------
    def holder_alive(self, holder: Optional[dict]) -> Optional[str]:
        """Why the lock at `path` is held by a live run (a phrase), or None if it is stale."""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        flock = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            flock = _try_flock(fd)
        finally:
            os.close(fd)  # closing drops a flock we took just to test it
        if flock is False:
            return "its lock is held"
        if holder is None:  # being written this instant, or garbage from a crash long ago
            return "its lock is being created" if age < self.stale_after_s else None
        if holder.get("host") == socket.gethostname():
            start = _process_start(int(holder.get("pid", -1)))
            alive = start is not None and abs(start - float(holder.get("start", 0))) < 1.0
            return "it is running" if alive else None
        if age < self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old"
        return None

    def check(self) -> None:
        """Refuse (one line) when a live run holds the lock; does not take it."""
        holder = _read(self.path)
        why = self.holder_alive(holder) if os.path.exists(self.path) else None
        if why:
            who = describe_holder(holder) if holder else "unknown holder"
            raise ConfigError(f"{self.directory}: another run writes checkpoints here ({who}; "
                              f"{why}); stop it or choose another --save")

    # ---- taking and keeping it --------------------------------------------------------------
    def acquire(self) -> Optional[str]:
        """Take the lock or raise `ConfigError` naming the live holder. Returns a note when a
        dead run's lock was taken over (None otherwise)."""
        os.makedirs(self.directory, exist_ok=True)
        note = None
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="megatron-llama-lock-heartbeat")
                self._thread.start()
                return note
            holder = _read(self.path)
            self.check()  # raises when alive
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                continue  # another run took it over first; try to create again
            taken = _read(aside)
            if taken != holder and self.holder_alive(taken) is not None:
                # between our read and our rename another run made a fresh lock: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                self.check()
                continue
            os.unlink(aside)
            note = (f"took over the lock of a run that is gone ({describe_holder(holder)})"
                    if holder else "took over a stale lock")
        raise ConfigError(f"{self.directory}: could not take {LOCK_FILE} (other runs keep "
                          "starting on this --save)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot create the run's lock ({e.strerror})") from None
        pid = os.getpid()
        holder = {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid),
                  "token": self.token}
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
        _try_flock(fd)  # held until this process exits (or `release`)
        self.fd = fd
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a filesystem hiccup: the next beat tries again

    def release(self) -> None:
        """Give the lock up (at the end of a run): stop the heartbeat, remove the file."""
        self._stop.set()
        if self.fd is None:
            return
        holder = _read(self.path)
        if holder and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None
