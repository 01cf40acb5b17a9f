"""Verified checkpoints for both engines: checksums at save, verification and fallback at
load, ``--keep-last`` pruning, leftovers of failed saves removed. All functions here are
collective (every rank calls them; each sums or checks its share of the files).

The file-level work is `resilience.integrity`; this module splits it over the ranks and
agrees on the outcome, so every rank loads the same checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

from megatron_llama.checkpoint_files import iteration_dir
from megatron_llama.errors import ConfigError
from megatron_llama.resilience import integrity


def _gather(value):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


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
    """Rank 0, while it holds the run's lock: ``iter_N.tmp`` folders of saves that never
    finished (a crash or a full disk mid-save). Returns what was removed."""
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if name.endswith(".tmp") and name.startswith("iter_") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
