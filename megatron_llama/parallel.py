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
    cp: int = field(default=1, metadata={
        "help": "context-parallel size: each sequence split over this many ranks (megatron-"
                "core's ring attention; GPUs with Transformer Engine only)"})
    first_stage_layers: Optional[int] = field(default=None, metadata={
        "help": "transformer layers on the first pipeline stage (uneven PP, e.g. Llama 3.1 "
                "405B's 126 layers on PP=16 as 7 + 14 x 8 + 7); the rest split evenly"})
    last_stage_layers: Optional[int] = field(default=None, metadata={
        "help": "transformer layers on the last pipeline stage (uneven PP; it also holds "
                "the output layer and the loss)"})
    embedding_and_loss_as_layers: bool = field(default=False, metadata={
        "help": "count the embedding and the output layer + loss as one transformer layer "
                "each when splitting layers over pipeline stages (lighter first and last "
                "stages that still allow --vp: Llama 3.1 405B's 126 + 2 = PP16 x VP2 x 4)"})

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def ranks_per_replica(self) -> int:
        """Ranks holding one copy of the model's data-parallel state: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        return world_size // self.ranks_per_replica

    def chunk_counts(self, n_layers: int) -> dict[tuple[int, int], int]:
        """Transformer layers in each (pp_rank, vp_stage) chunk, as megatron-core builds them."""
        from megatron_llama.model.canonical import chunk_layer_counts

        return chunk_layer_counts(n_layers, self.pp, self.vp, self.first_stage_layers,
                                  self.last_stage_layers, self.embedding_and_loss_as_layers)

    def stage_layers(self, n_layers: int) -> list[int]:
        """Transformer layers on each pipeline stage."""
        counts = self.chunk_counts(n_layers)
        return [sum(n for (p, _), n in counts.items() if p == stage) for stage in range(self.pp)]

    @property
    def uneven(self) -> bool:
        return (self.first_stage_layers is not None or self.last_stage_layers is not None
                or self.embedding_and_loss_as_layers)

    def describe(self, world_size: int) -> str:
        vp = f" VP={self.vp}" if self.vp else ""
        cp = f" CP={self.cp}" if self.cp > 1 else ""
        split = ""
        if self.embedding_and_loss_as_layers:
            split = " (embedding and loss as layers)"
        elif self.uneven:
            ends = [f"{name} {n}" for name, n in (("first", self.first_stage_layers),
                                                  ("last", self.last_stage_layers)) if n]
            split = f" ({' / '.join(ends)} layers)"
        return (f"TP={self.tp}{' (SP)' if self.sp else ''}{cp} PP={self.pp}{vp}{split} "
                f"DP={self.dp(world_size)}")

    def check(self, cfg: LlamaConfig, world_size: Optional[int] = None,
              micro_batch: Optional[int] = None, global_batch: Optional[int] = None) -> None:
        """Raise `ConfigError` (one line) if this layout cannot run ``cfg``."""
        if (self.tp < 1 or self.pp < 1 or self.cp < 1
                or (self.vp is not None and self.vp < 1)):
            raise ConfigError(f"TP, PP, CP and VP must be positive, got {self}")
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
        if self.embedding_and_loss_as_layers:
            self._check_ends_as_layers(cfg.n_layers)
        elif self.uneven:
            self._check_uneven(cfg.n_layers)
        else:
            stages = self.pp * (self.vp or 1)
            if cfg.n_layers % stages:
                hint = (" (uneven stages: --embedding-and-loss-as-layers or --first-stage-"
                        "layers / --last-stage-layers)" if self.pp > 2 else "")
                raise ConfigError(f"n_layers={cfg.n_layers} is not divisible by "
                                  f"PP*VP={stages}{hint}")
        if self.vp is not None and self.vp > 1 and self.pp == 1:
            raise ConfigError("virtual pipeline stages need PP > 1")
        if world_size is not None:
            if world_size % self.ranks_per_replica:
                what = "TP*PP*CP" if self.cp > 1 else "TP*PP"
                raise ConfigError(f"world size {world_size} is not divisible by "
                                  f"{what}={self.ranks_per_replica}")
            dp = self.dp(world_size)
            if micro_batch is not None and global_batch is not None:
                if global_batch % (micro_batch * dp):
                    raise ConfigError(f"global batch {global_batch} is not divisible by "
                                      f"micro batch {micro_batch} x DP {dp}")
                n_micro = global_batch // (micro_batch * dp)
                if self.vp and self.vp > 1 and n_micro % self.pp:
                    raise ConfigError(f"interleaved pipeline needs the number of microbatches "
                                      f"({n_micro}) to be a multiple of PP={self.pp}")


    def _check_ends_as_layers(self, n_layers: int) -> None:
        v = self.vp or 1
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            raise ConfigError("--embedding-and-loss-as-layers and --first/--last-stage-layers "
                              "are two ways to lighten the end stages: choose one")
        if self.pp == 1:
            raise ConfigError("--embedding-and-loss-as-layers needs PP > 1")
        if (n_layers + 2) % (self.pp * v):
            raise ConfigError(f"n_layers={n_layers} + 2 (embedding and loss) is not divisible "
                              f"by PP*VP={self.pp * v}")

    def _check_uneven(self, n_layers: int) -> None:
        """megatron-core's rules for uneven stages, as one-line errors."""
        v = self.vp or 1
        if self.pp == 1:
            raise ConfigError("--first-stage-layers / --last-stage-layers need PP > 1")
        for name, value in (("first", self.first_stage_layers), ("last", self.last_stage_layers)):
            if value is not None and (value < 1 or value % v):
                raise ConfigError(f"{name}_stage_layers={value} must be a positive multiple of "
                                  f"VP={v}")
        middle_stages = self.pp - (self.first_stage_layers is not None) - (
            self.last_stage_layers is not None)
        middle = n_layers - (self.first_stage_layers or 0) - (self.last_stage_layers or 0)
        if self.vp and middle_stages == 0:
            raise ConfigError(f"with --vp, uneven stages need a middle stage: PP={self.pp} with "
                              "both --first-stage-layers and --last-stage-layers leaves none "
                              "(set one of them, or raise PP)")
        if middle < 0 or bool(middle) != bool(middle_stages) or (
                middle_stages and middle % (middle_stages * v)):
            raise ConfigError(f"n_layers={n_layers} minus the first/last stage layers leaves "
                              f"{middle} for {middle_stages} middle stage(s) x VP={v}: not an "
                              "even split")


def check_context_parallel_host(cp: int) -> None:
    """Refuse, with one line, ``--cp`` > 1 on a host that cannot run it: megatron-core's
    context parallelism is ring attention inside Transformer Engine's fused attention (a
    CUDA kernel; its local attention asserts CP = 1). `plan` and `sbatch` check the layout
    itself anywhere; this is the check of the host that runs it."""
    if cp == 1:
        return
    import torch

    from megatron_llama.model.spec import transformer_engine_available

    if not torch.cuda.is_available():
        raise ConfigError(f"--cp {cp}: context parallelism runs megatron-core's ring attention "
                          "in Transformer Engine's CUDA attention kernels; this host has no GPU "
                          "(use --cp 1 here)")
    if not transformer_engine_available():
        raise ConfigError(f"--cp {cp}: context parallelism needs Transformer Engine (pip install "
                          "--no-build-isolation 'transformer_engine[pytorch]'); it does not "
                          "import here")


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
    """The torch.distributed backend for this host: with CUDA, nccl for GPU tensors and gloo
    for the few small CPU tensors the loop and the checkpoint code exchange (a loss and a
    signal flag, error agreement); gloo alone without CUDA."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


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
    if "nccl" in backend:
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
    if world % layout.ranks_per_replica:
        raise ConfigError(f"world size {world} is not divisible by TP*PP*CP="
                          f"{layout.ranks_per_replica}")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        context_parallel_size=layout.cp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core's process groups (torch.distributed stays up)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
