"""Parallel layouts: validation before any work, and megatron-core process-group setup.

A `ParallelLayout` says how a model is cut: tensor (TP), sequence (SP, rides on TP),
pipeline (PP) with optional virtual stages (VP), and data parallel (DP = world / (TP*PP)).
`ParallelLayout.check` refuses layouts that cannot work, with one line, before any process
group or weight exists. `initialize` applies the runtime adaptations (`megatron_llama.compat`:
gloo on CPU, NCCL on GPU) and the host tuning, creates megatron-core's process groups and
seeds the RNGs the way megatron-core expects.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig


@dataclass(frozen=True)
class ParallelLayout:
    """How the model is cut; the field metadata are `pretrain`'s flag help."""

    tp: int = field(default=1, metadata={"help": "tensor-parallel size"})
    pp: int = field(default=1, metadata={"help": "pipeline-parallel size"})
    vp: Optional[int] = field(default=None, metadata={
        "help": "virtual pipeline stages per rank (interleaved 1F1B)"})
    sp: bool = field(default=False, metadata={"help": "sequence parallelism (needs --tp > 1)"})

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def dp(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def describe(self, world_size: int) -> str:
        vp = f" VP={self.vp}" if self.vp else ""
        return f"TP={self.tp}{' (SP)' if self.sp else ''} PP={self.pp}{vp} DP={self.dp(world_size)}"

    def check(self, cfg: LlamaConfig, world_size: Optional[int] = None,
              micro_batch: Optional[int] = None, global_batch: Optional[int] = None) -> None:
        """Raise `ConfigError` (one line) if this layout cannot run ``cfg``."""
        if self.tp < 1 or self.pp < 1 or (self.vp is not None and self.vp < 1):
            raise ConfigError(f"TP, PP and VP must be positive, got {self}")
        if cfg.n_heads % self.tp:
            raise ConfigError(f"n_heads={cfg.n_heads} is not divisible by TP={self.tp} "
                              f"(legal TP: {_power_of_two_divisors(cfg.n_heads)})")
        if cfg.num_kv_heads % self.tp:
            raise ConfigError(f"n_kv_heads={cfg.num_kv_heads} is not divisible by TP={self.tp}: "
                              "megatron-core gives each TP rank whole KV groups (legal TP: "
                              f"{_power_of_two_divisors(cfg.num_kv_heads)}; for more GPUs raise "
                              "PP or DP)")
        if cfg.ffn_hidden_size % self.tp:
            raise ConfigError(f"FFN width {cfg.ffn_hidden_size} is not divisible by TP={self.tp}")
        if self.sp and self.tp == 1:
            raise ConfigError("sequence parallelism needs TP > 1")
        stages = self.pp * (self.vp or 1)
        if cfg.n_layers % stages:
            raise ConfigError(f"n_layers={cfg.n_layers} is not divisible by PP*VP={stages}")
        if self.vp is not None and self.vp > 1 and self.pp == 1:
            raise ConfigError("virtual pipeline stages need PP > 1")
        if world_size is not None:
            if world_size % self.model_parallel_size:
                raise ConfigError(f"world size {world_size} is not divisible by "
                                  f"TP*PP={self.model_parallel_size}")
            dp = self.dp(world_size)
            if micro_batch is not None and global_batch is not None:
                if global_batch % (micro_batch * dp):
                    raise ConfigError(f"global batch {global_batch} is not divisible by "
                                      f"micro batch {micro_batch} x DP {dp}")
                n_micro = global_batch // (micro_batch * dp)
                if self.vp and self.vp > 1 and n_micro % self.pp:
                    raise ConfigError(f"interleaved pipeline needs the number of microbatches "
                                      f"({n_micro}) to be a multiple of PP={self.pp}")


def _power_of_two_divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0 and d & (d - 1) == 0)


def launcher_world_size() -> int:
    """World size announced by torchrun (WORLD_SIZE) or srun (SLURM_NTASKS); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def _slurm_rendezvous() -> None:
    """Under srun without torchrun: MASTER_ADDR = the job's first host, a port from the job id.

    An sbatch script may set both itself (then they are kept).
    """
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", ""))
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                   capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError):
            hosts = []
        os.environ["MASTER_ADDR"] = hosts[0] if hosts else os.environ.get(
            "SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))


def distributed_backend() -> str:
    """The torch.distributed backend for this host: nccl with CUDA, gloo without."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: int = 600) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun/srun environment variables if needed.

    Returns (rank, world_size). A single process without any launcher gets world size 1
    (an in-memory store: no port, no file).
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    _slurm_rendezvous()
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = launcher_world_size()
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = distributed_backend()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        torch.cuda.set_device(local_rank)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # one process: an in-memory store (no port, no file left behind)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return rank, world


def initialize(layout: ParallelLayout, seed: int = 1234) -> None:
    """Create megatron-core's TP/PP/DP groups for ``layout`` and seed every RNG.

    torch.distributed must be initialised (see `init_distributed`). Call `destroy` to undo.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_llama import compat, process_tuning

    compat.install()
    process_tuning.tune_process()
    world = dist.get_world_size()
    if world % layout.model_parallel_size:
        raise ConfigError(f"world size {world} is not divisible by TP*PP={layout.model_parallel_size}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core's process groups (torch.distributed stays up)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
