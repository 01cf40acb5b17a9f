"""Checkpoints through megatron-core dist_checkpointing: complete, atomic, reshardable.

Layout of a checkpoint root:
    <root>/iter_0000100/          dist_checkpointing files (model, optimizer, scheduler, RNG,
                                  train state: iteration, consumed samples, skipped steps)
    <root>/iter_0000100/megatron_llama.json   model config (Meta's names) and layout
    <root>/latest_checkpointed_iteration.txt  written last, atomically

A checkpoint is written into ``iter_N.tmp`` and renamed only after every rank finished, and
the tracker names it only after that, so "latest" is always complete; a crash mid-save
leaves the previous checkpoint as latest. The model and the optimizer use reshardable
formats, so a run can resume under another TP/PP layout.

Slurm delivers SIGUSR1 / SIGTERM (the signals that ask for a last checkpoint) to every
process of a job step, so dist_checkpointing's helper processes (its results-queue manager,
which lives as long as the rank, and the per-save writers) start with both signals blocked:
otherwise the default action kills them and the very save the signal asked for fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from typing import Optional

import torch

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megatron_llama.json"
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit() or not os.path.isdir(iteration_dir(root, int(text))):
        from megatron_llama.config import ConfigError

        raise ConfigError(f"{path}: names no complete checkpoint ({text!r})")
    return int(text)


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


def _sharded_state(chunks, optimizer, scheduler, train_state: dict, is_loading: bool,
                   optimizer_metadata: dict, with_rng: bool = True) -> dict:
    # The GPTModel inside each DDP wrapper: keys are global (layer offsets per stage/chunk).
    sd: dict = {_model_key(i, len(chunks)): c.module.sharded_state_dict()
                for i, c in enumerate(chunks)}
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                   metadata=optimizer_metadata)
    sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = dict(train_state)
    if with_rng:
        sd["rng_state"] = _rng_object()
    return sd


def save(root: str, iteration: int, chunks, optimizer, scheduler, train_state: dict,
         metadata: Optional[dict] = None) -> str:
    """Save on all ranks (collective); returns the checkpoint directory."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    sd = _sharded_state(chunks, optimizer, scheduler, train_state, is_loading=False,
                        optimizer_metadata=OPTIMIZER_SHARDING)
    with _stop_signals_blocked():  # inherited by the helper processes the save starts
        dist_checkpointing.save(sd, tmp, content_metadata=OPTIMIZER_SHARDING)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
            json.dump(metadata or {}, f, indent=1)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return final


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
    path = iteration_dir(root, iteration)
    meta = _saved_metadata(path)
    from megatron_llama.safe_loading import reading
    if expected_model is not None and meta.get("model") not in (None, expected_model):
        from megatron_llama.config import ConfigError

        diff = sorted(k for k in set(expected_model) | set(meta["model"])
                      if expected_model.get(k) != meta["model"].get(k))
        raise ConfigError(f"{path}: checkpoint is of a different model ({', '.join(diff)} "
                          "differ); choose another --save/--load")
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
        chunk.module.load_state_dict(loaded[_model_key(i, len(chunks))], strict=True)
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


def _saved_metadata(path: str) -> dict:
    meta = os.path.join(path, METADATA)
    if not os.path.isfile(meta):
        return {}
    from megatron_llama.config import read_json_object

    return read_json_object(meta)
