"""The megatron-core engine's checkpoints (dist_checkpointing): complete, atomic, reshardable.

Where the files are is `megatron_llama.checkpoint_files` (shared with `convert`); each
``iter_N`` folder holds the model, optimizer, scheduler, RNG and train state (iteration,
consumed samples, skipped steps).

A checkpoint is written into ``iter_N.tmp`` and renamed only after every rank finished (and
the ranks recorded a checksum of every file in its metadata), and the tracker names it only
after that, so "latest" is always complete; loading verifies the checksums first and falls
back to the previous complete checkpoint when the latest is damaged (`engines.verified`); a crash mid-save
leaves the previous checkpoint as latest. The model and the optimizer use reshardable
formats, so a run can resume under another TP/PP layout.

Slurm delivers SIGUSR1 / SIGTERM (the signals that ask for a last checkpoint) to every
process of a job step, so dist_checkpointing's helper processes (its results-queue manager,
which lives as long as the rank, and the per-save writers) start with both signals blocked:
otherwise the default action kills them and the very save the signal asked for fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_llama.checkpoint_files import (
    METADATA,
    TRACKER,
    iteration_dir,
    latest_iteration,
    read_checkpoint_metadata,
)
from megatron_llama.errors import ConfigError
from megatron_llama.fileio import commit_directory, write_json, write_text
from megatron_llama.model.config import model_differences
from megatron_llama.model.lora import is_adapter
from megatron_llama.training.engines.verified import (
    agree_on_error,
    choose_iteration,
    describe_write_error,
    injected_write_failure,
    prune,
    record_checksums,
    save_failed,
)

_WRITER_LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"
# dist_checkpointing reports any rank's OSError in torch's CheckpointException (a
# BaseException) or in its own exception types
_SAVE_ERRORS: tuple = (Exception, CheckpointException)
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rng_object():
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    return ShardedObject("rng_state", [state],
                         (ps.get_pipeline_model_parallel_world_size(),
                          ps.get_tensor_model_parallel_world_size()),
                         (pp, tp), replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def adapters_only(chunks) -> bool:
    """Whether the model trains adapters over a frozen base: its checkpoints then hold the
    adapters (and their optimizer states) only; the base comes from where the run began."""
    return any(not p.requires_grad for c in chunks for p in c.parameters())


def _model_state(chunk, adapters: bool) -> dict:
    # The GPTModel inside each DDP wrapper: keys are global (layer offsets per stage/chunk).
    sd = chunk.module.sharded_state_dict()
    return {k: v for k, v in sd.items() if is_adapter(k)} if adapters else sd


def _sharded_state(chunks, optimizer, scheduler, train_state: dict, is_loading: bool,
                   optimizer_metadata: dict, with_rng: bool = True) -> dict:
    adapters = adapters_only(chunks)
    sd: dict = {_model_key(i, len(chunks)): _model_state(c, adapters)
                for i, c in enumerate(chunks)}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                   metadata=optimizer_metadata)
    sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = dict(train_state)
    if with_rng:
        sd["rng_state"] = _rng_object()
    return sd


@dataclass
class PendingSave:
    """An asynchronous save whose files are still being written (see `save`)."""

    root: str
    iteration: int
    metadata: dict
    keep_last: int

    @property
    def tmp(self) -> str:
        return iteration_dir(self.root, self.iteration) + ".tmp"


def save(root: str, iteration: int, chunks, optimizer, scheduler, train_state: dict,
         metadata: Optional[dict] = None, keep_last: int = 0,
         async_queue=None) -> Optional[PendingSave]:
    """Save on all ranks (collective).

    Synchronous by default: returns when the checkpoint is committed (and older ones beyond
    ``keep_last`` removed). With ``async_queue`` (megatron-core's ``AsyncCallsQueue``) the
    tensors are handed to a forked writer process per rank and a `PendingSave` is returned
    at once; `finish` commits it once every rank's writer is done. Either way the commit is
    the same: checksums, metadata, rename, then the tracker.

    A write error on any rank (a full disk, a quota, an I/O error) fails the save on every
    rank alike: the partial ``iter_N.tmp`` is removed, the previous checkpoint stays the
    latest, and a one-line `ConfigError` says so.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    pending = PendingSave(root, iteration, dict(metadata or {}), keep_last)
    error = None
    if dist.get_rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(pending.tmp, ignore_errors=True)
            os.makedirs(pending.tmp)
        except OSError as e:
            error = describe_write_error(e)
    _fail_if(agree_on_error(error), pending)
    # its writers log a failed write at ERROR, then raise it: we report it, in one line
    logging.getLogger(_WRITER_LOGGER).setLevel(logging.CRITICAL)
    sd = _sharded_state(chunks, optimizer, scheduler, train_state, is_loading=False,
                        optimizer_metadata=OPTIMIZER_SHARDING)
    try:
        with _stop_signals_blocked():  # inherited by the helper processes the save starts
            request = dist_checkpointing.save(sd, pending.tmp, content_metadata=OPTIMIZER_SHARDING,
                                              async_sharded_save=async_queue is not None)
            if async_queue is not None:
                async_queue.schedule_async_request(request)  # forks this rank's writer
    except _SAVE_ERRORS as e:
        error = describe_write_error(e)
    _fail_if(agree_on_error(error), pending)
    if async_queue is not None:
        return pending
    _commit(pending)
    return None


def finish(pending: PendingSave, async_queue, blocking: bool) -> bool:
    """Collective: commit ``pending`` if every rank's writer is done (wait for them when
    ``blocking``); returns whether it was committed."""
    error = None
    try:
        done = bool(async_queue.maybe_finalize_async_calls(blocking=blocking))
    except _SAVE_ERRORS as e:  # raised on every rank when any rank's writer failed
        done, error = True, describe_write_error(e)
    _fail_if(error, pending)
    if done:
        _commit(pending)
    return done


def _commit(pending: PendingSave) -> None:
    """Checksums (each rank reads back its share), metadata, rename, tracker, pruning."""
    import torch.distributed as dist

    error = None
    try:
        injected_write_failure(pending.iteration, dist.get_rank())  # symmetric: all ranks here
    except OSError as e:
        error = describe_write_error(e)
    _fail_if(agree_on_error(error), pending)
    files = record_checksums(pending.tmp)
    if dist.get_rank() == 0:
        try:
            write_json({**pending.metadata, "files": files},
                       os.path.join(pending.tmp, METADATA))
            commit_directory(pending.tmp, iteration_dir(pending.root, pending.iteration))
            write_text(os.path.join(pending.root, TRACKER), str(pending.iteration))
            prune(pending.root, pending.keep_last, pending.iteration)
        except (OSError, ConfigError) as e:
            error = describe_write_error(e)
    _fail_if(agree_on_error(error), pending)


def _fail_if(error: Optional[str], pending: PendingSave) -> None:
    """Collective: on an error every rank saw, remove the partial folder and raise."""
    if error is None:
        return
    import torch.distributed as dist

    # rank 0's words for every rank (one line, printed once), with the free space as it
    # was at the failure, before the partial files are removed
    message = [save_failed(pending.root, pending.iteration, error)
               if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(message, src=0)
    if dist.get_rank() == 0:
        shutil.rmtree(pending.tmp, ignore_errors=True)
    dist.barrier()
    raise ConfigError(message[0])


@contextlib.contextmanager
def _stop_signals_blocked():
    """Block SIGUSR1/SIGTERM in this thread (and so in processes started meanwhile).

    A signal arriving meanwhile stays pending (or is taken by another thread) and reaches
    the training loop's handler afterwards. multiprocessing's resource tracker unblocks
    SIGTERM when it first starts, so it is started first.
    """
    from multiprocessing import resource_tracker

    stop = {signal.SIGUSR1, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def load(root: str, chunks, optimizer, scheduler, expected_model: Optional[dict] = None
         ) -> Optional[dict]:
    """Load the latest checkpoint under ``root`` into the (already built) objects.

    Returns the saved train state, or None when ``root`` holds no checkpoint or only model
    weights (a converted checkpoint: training then starts at step 0 from them). RNG states are
    restored only when the layout is unchanged (they are per TP/PP rank). A checkpoint of a
    different model (``expected_model``: params.json fields) is refused with one line.
    """
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        return None
    iteration = choose_iteration(root, iteration)  # verified, or the newest earlier that is
    path = iteration_dir(root, iteration)
    meta = read_checkpoint_metadata(path)
    diff = (model_differences(meta["model"], expected_model)
            if expected_model is not None and meta.get("model") is not None else [])
    if diff:
        raise ConfigError(f"{path}: checkpoint is of a different model ({', '.join(diff)} "
                          "differ); choose another --save/--load")
    from megatron_llama.compat.safe_loading import reading

    adapters = adapters_only(chunks)
    if adapters != bool(meta.get("adapters_only")):
        raise ConfigError(f"{path}: a checkpoint of " + (
            "LoRA adapters; resume it with the same --lora-rank" if meta.get("adapters_only")
            else "a full model; LoRA runs resume only their own adapter checkpoints (start "
            "the LoRA run in another --save directory, --from this one)"))
    if meta.get("model_only"):  # e.g. converted from Meta's weights: start from them at step 0
        with reading(path):  # no pickled code runs
            loaded = dist_checkpointing.load(
                {_model_key(i, len(chunks)): c.module.sharded_state_dict()
                 for i, c in enumerate(chunks)}, path)
        for i, chunk in enumerate(chunks):
            chunk.module.load_state_dict(loaded[_model_key(i, len(chunks))], strict=True)
        optimizer.reload_model_params()  # fp32 main weights from the loaded model weights
        return None
    same_layout = meta.get("layout") == _current_layout()
    with reading(path):  # no pickled code runs
        saved_sharding = dist_checkpointing.load_content_metadata(path) or OPTIMIZER_SHARDING
        sd = _sharded_state(chunks, optimizer, scheduler, {}, is_loading=True,
                            optimizer_metadata=saved_sharding, with_rng=same_layout)
        loaded = dist_checkpointing.load(sd, path)
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded[_model_key(i, len(chunks))], strict=not adapters)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.num_steps = 0  # load_state_dict adds the saved step count to the current one
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout and "rng_state" in loaded:
        from megatron.core import tensor_parallel

        rng = loaded["rng_state"][0]
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return dict(loaded["train_state"])


def _current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vp": ps.get_virtual_pipeline_model_parallel_world_size()}
