"""Verified checkpoints for both engines: checksums at save, verification and fallback at
load, ``--keep-last`` pruning, leftovers of failed saves removed. All functions here are
collective (every rank calls them; each sums or checks its share of the files).

The file-level work is `resilience.integrity`; this module splits it over the ranks and
agrees on the outcome, so every rank loads the same checkpoint.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from typing import Optional

from megatron_llama.checkpoint_files import (
    TAG_PREFIX,
    deepspeed_latest_tag,
    iteration_dir,
    latest_iteration,
)
from megatron_llama.errors import ConfigError
from megatron_llama.resilience import integrity


def _gather(value):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# Fault injection: "STEP" or "STEP:RANK": that rank's (every rank's) save of that step fails
# with ENOSPC once its files are written, as a full disk does (tests use a real small tmpfs
# where they can mount one).
WRITE_FAILURE_TEST_ENV = "MEGATRON_LLAMA_TEST_ENOSPC_AT"


def injected_write_failure(iteration: int, rank: int) -> None:
    at, _, who = os.environ.get(WRITE_FAILURE_TEST_ENV, "").partition(":")
    if at and int(at) == iteration and (not who or int(who) == rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def describe_write_error(e: BaseException) -> str:
    """The cause of a failed write in a few words: ``No space left on device (errno 28)``.
    dist_checkpointing reports its writers' errors inside torch's CheckpointException
    (``failures``: rank -> (exception, traceback)) or in the text of its own."""
    causes = list(_causes(e))
    for cause in causes:  # an OSError with its errno says the most
        if isinstance(cause, OSError) and cause.errno:
            return f"{cause.strerror} (errno {cause.errno})"
    for cause in causes:
        found = re.search(r"\[Errno (\d+)\] ([^\n'\"]+)", str(cause))
        if found:
            return f"{found.group(2).strip()} (errno {found.group(1)})"
    lines = str(causes[-1]).strip().splitlines()
    return lines[0][:200] if lines else type(causes[-1]).__name__


def _causes(e: BaseException):
    yield e
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                yield from _causes(inner)
    if e.__cause__ is not None:
        yield from _causes(e.__cause__)


def agree_on_error(error: Optional[str]) -> Optional[str]:
    """Every rank's view of a collective step: the most telling rank's error (one with an
    errno, such as a full disk, over a writer's follow-on error), or None."""
    errors = [e for e in _gather(error) if e]
    with_errno = [e for e in errors if "(errno " in e]
    return (with_errno or errors or [None])[0]


def latest_saved(root: str) -> Optional[int]:
    """The iteration the pointer file of either engine names, or None."""
    try:
        latest = latest_iteration(root)
    except ConfigError:
        latest = None
    if latest is None:
        tag = deepspeed_latest_tag(root) or ""
        if re.fullmatch(rf"{TAG_PREFIX}\d+", tag):
            latest = int(tag[len(TAG_PREFIX):])
    return latest


def save_failed(root: str, iteration: int, error: str, removed: bool = True) -> str:
    """The one line of a save that failed (``removed``: its partial files are gone already;
    else the next run removes them)."""
    latest = latest_saved(root)
    still = (f"the latest checkpoint is still step {latest}, which the same command resumes "
             "from" if latest is not None else "there is no earlier checkpoint")
    try:
        usage = shutil.disk_usage(root)
        space = (f" ({usage.free / 1e9:.2f} GB free of {usage.total / 1e9:.2f} GB there)"
                 if usage.free < 0.02 * usage.total else "")
    except OSError:
        space = ""
    partial = ("its partial files are removed" if removed
               else "the next run removes its partial files")
    return (f"{root}: cannot save the checkpoint of step {iteration}: {error}{space}; "
            f"{partial} and {still}")


def record_checksums(folder: str) -> dict[str, dict]:
    """Checksums of every file under ``folder`` (a checkpoint all ranks just wrote); each
    rank reads its share, every rank gets the whole manifest."""
    import torch.distributed as dist

    names = integrity.list_files(folder)
    mine = integrity.checksum_files(
        folder, integrity.share(names, dist.get_rank(), dist.get_world_size()))
    manifest: dict[str, dict] = {}
    for part in _gather(mine):
        manifest.update(part)
    return dict(sorted(manifest.items()))


def first_problem(folder: str) -> Optional[str]:
    """The first damaged, truncated or missing file of ``folder`` (one line), or None when
    every recorded file is as saved (or nothing was recorded)."""
    import torch.distributed as dist

    manifest = integrity.manifest_of(folder)
    if manifest is None:
        return None
    names = integrity.share(sorted(manifest), dist.get_rank(), dist.get_world_size())
    problems = [p for p in _gather(integrity.verify_files(folder, manifest, names)) if p]
    return problems[0] if problems else None


def choose_iteration(root: str, latest: int) -> int:
    """``latest`` if it verifies, else the newest earlier complete checkpoint that does (said
    once, on rank 0); a one-line `ConfigError` when none does."""
    import torch.distributed as dist

    candidates = [latest] + [i for i in integrity.complete_iterations(root) if i < latest]
    problems = []
    for iteration in candidates:
        problem = first_problem(iteration_dir(root, iteration))
        if problem is None:
            if problems and dist.get_rank() == 0:
                print(f"warning: {problems[0]}; resuming from the previous complete checkpoint "
                      f"{iteration_dir(root, iteration)} instead", file=sys.stderr, flush=True)
            return iteration
        problems.append(problem)
    more = "" if len(candidates) == 1 else f" (nor does any of the {len(candidates) - 1} earlier)"
    raise ConfigError(f"{problems[0]}; no checkpoint under {root} passes verification{more}")


def prune(root: str, keep_last: int, newest: int) -> None:
    """Rank 0: remove checkpoints older than the ``keep_last`` newest (``newest`` is complete
    and named by the pointer file already). 0 keeps everything."""
    if keep_last <= 0:
        return
    done = [i for i in integrity.complete_iterations(root) if i <= newest]
    for iteration in done[keep_last:]:
        shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def remove_failed_saves(root: str) -> list[str]:
    """Rank 0, while it holds the run's lock: the folders of saves that never finished (a
    crash or a full disk mid-save): ``iter_N.tmp``, and ``iter_N`` without metadata past the
    latest checkpoint (DeepSpeed writes in place). Returns what was removed."""
    latest = latest_saved(root)
    latest = -1 if latest is None else latest
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        unfinished = re.fullmatch(r"iter_\d+\.tmp", name) or (
            re.fullmatch(r"iter_\d+", name) and int(name[5:]) > latest
            and not integrity.is_committed(path))
        if unfinished and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
