"""Memory of a training step per rank, from the layout alone (pure math), and the check
`pretrain` runs before it starts anything.

Notation: s sequence, b micro batch, h dim, a heads, f SwiGLU width, V vocabulary, L layers,
t TP, p PP, v VP, d DP, m microbatches per pipeline, B bytes per activation element.

Memory per GPU (the worst pipeline stage; first and last are both evaluated):
- weights: stage parameters / t (norm weights replicated) x parameter bytes;
- gradients: megatron-core DDP keeps an fp32 buffer (``grad_reduce_in_fp32``): 4 bytes each;
- optimizer: Adam moments (8 bytes) + fp32 main weights (4, only when weights are not fp32),
  divided by d with the distributed optimizer;
- activations, counted the way Korthikanti et al. 2022 count them (tensors autograd keeps
  per layer), for LLaMA's layer as built here (`activation_units`), times the microbatches in
  flight (p on the first 1F1B stage, times 1 + (p-1)/(p v) when interleaved). SP divides the
  norm/residual part by t; selective recompute stores the same with flash attention; full
  recompute keeps each layer's input only. Attention is
  flash-style (the paper's xformers kernel; SDPA here), so no s^2 scores are stored;
- transient: the larger of the last stage's fp32 logits/softmax s b V / t (plus the output
  layer's weight gradient before it joins the fp32 buffer) and, under full recompute, one
  layer's activations being recomputed (the logits are gone by then).

`check_memory_fits` compares the prediction with this host (host RAM shared by the local
ranks on CPU, free GPU memory on GPUs) and refuses a run that cannot fit with one line that
says what would fit, instead of letting the kernel OOM-kill a rank minutes later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout

GB = 1e9


@dataclass(frozen=True)
class PlanLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: Optional[int] = None
    sp: bool = False
    micro_batch: int = 1
    recompute: str = "none"            # none | selective | full
    distributed_optimizer: bool = True
    cp: int = 1                        # context parallel: each sequence over cp ranks
    first_stage_layers: Optional[int] = None   # uneven pipeline stages (ParallelLayout's)
    last_stage_layers: Optional[int] = None
    ends_as_layers: bool = False               # embedding and loss counted as layers

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def stage_layers(self, n_layers: int) -> list[int]:
        return self.parallel().stage_layers(n_layers)

    def __post_init__(self) -> None:
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"recompute must be none, selective or full, not {self.recompute!r}")
        for name in ("tp", "pp", "dp", "micro_batch", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")

    def parallel(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, vp=self.vp, sp=self.sp, cp=self.cp,
                              first_stage_layers=self.first_stage_layers,
                              last_stage_layers=self.last_stage_layers,
                              embedding_and_loss_as_layers=self.ends_as_layers)

    def describe(self) -> str:
        vp = f" VP={self.vp}" if self.vp else ""
        cp = f" CP={self.cp}" if self.cp > 1 else ""
        ends = "/".join(str(n) for n in (self.first_stage_layers, self.last_stage_layers)
                        if n is not None)
        uneven = (" (emb+loss as layers)" if self.ends_as_layers
                  else f" ({ends} at the ends)" if ends else "")
        return (f"TP={self.tp}{'+SP' if self.sp else ''}{cp} PP={self.pp}{vp}{uneven} DP={self.dp} "
                f"mb={self.micro_batch} rc={self.recompute}"
                f"{' distopt' if self.distributed_optimizer else ''}")


@dataclass
class Memory:
    """Bytes per GPU on the worst stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float        # largest short-lived block: logits/softmax or a recomputed layer
    stage: str = "first"

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient


def stage_params(cfg: LlamaConfig, tp: int, pp: int, first: bool, last: bool,
                 layers: Optional[int] = None) -> int:
    """Parameters one GPU holds on a first / last pipeline stage (padded vocab, TP slice) of
    ``layers`` transformer layers (default: an even share)."""
    h = cfg.dim
    layers = cfg.n_layers // pp if layers is None else layers
    norms = 2 * h                                       # replicated across TP
    params = layers * ((cfg.layer_params() - norms) // tp + norms)
    vocab_rows = cfg.padded_vocab_size(tp) // tp
    if first:
        params += vocab_rows * h                        # input embedding
    if last:
        params += vocab_rows * h + h                    # output layer + final norm
    return params


def activation_units(cfg: LlamaConfig, tp: int, sp: bool, recompute: str) -> float:
    """Stored activations of one layer in units of s*b*h elements (this implementation).

    - each RMSNorm keeps its input, the normalised tensor and the weighted output: 3 per norm,
      6 per layer, replicated over TP unless SP splits the sequence;
    - attention (per TP rank): the fused QKV output (1 + 2 kv/a), rotated q and k (1 + kv/a),
      SDPA's output and the [s, b, h] copy `linear_proj` keeps: 4 + 3 kv/a;
    - SwiGLU (per TP rank): fc1's [gate; up] output 2f, silu(gate) f, the product f: 4 f / h.
    Full recompute keeps only the layer input. Selective (core attention) recompute keeps
    the same tensors with a flash-style kernel (its q, k, v inputs are kept for the recompute,
    its output for `linear_proj`; measured identical on CPU): it only saves the s^2 scores of
    non-flash kernels, which are not stored here in the first place.
    """
    r = cfg.num_kv_heads / cfg.n_heads
    replicated = 6.0 / (tp if sp else 1)
    if recompute == "full":
        return 1.0 / (tp if sp else 1)
    attention = 4.0 + 3.0 * r
    mlp = 4.0 * cfg.ffn_hidden_size / cfg.dim
    return replicated + (attention + mlp) / tp


def memory_per_gpu(cfg: LlamaConfig, lay: PlanLayout, seq: int, microbatches: int,
                   param_bytes: int = 2, act_bytes: Optional[int] = None) -> Memory:
    """Predicted peak bytes per GPU for ``lay`` (see the module docstring), worst stage.

    Context parallelism keeps s / cp tokens per rank and shards the distributed optimizer
    over DP x CP; uneven stages are evaluated at their own layer counts."""
    act_bytes = act_bytes or param_bytes
    h, b, t, p = cfg.dim, lay.micro_batch, lay.tp, lay.pp
    s = seq // lay.cp
    sbh = s * b * h
    counts = lay.stage_layers(cfg.n_layers)
    in_flight = min(p, microbatches)
    if lay.vp and lay.vp > 1:
        in_flight *= 1 + (p - 1) / (p * lay.vp)
    full_layer = activation_units(cfg, t, lay.sp, "none") * sbh * act_bytes
    per_layer = activation_units(cfg, t, lay.sp, lay.recompute) * sbh * act_bytes
    final_norm = 3 * sbh * act_bytes / (t if lay.sp else 1)
    recompute_buffer = full_layer if lay.recompute == "full" else 0.0
    optimizer_bytes = 8 + (4 if param_bytes != 4 else 0)
    results = []
    stages = {(True, p == 1, 0), (p == 1, True, p - 1)}
    if p > 2 and counts[1] > counts[0]:  # uneven: a fuller second stage may be the worst
        stages.add((False, False, 1))
    for first, last, index in stages:
        layers = counts[index]
        params = stage_params(cfg, t, p, first, last, layers)
        # the last stage holds one microbatch's activations at its peak (1F1B), stage i
        # about p - i
        stage_in_flight = max(1.0, in_flight - index) if not last else 1
        acts = layers * per_layer * stage_in_flight
        logits = 0.0
        if last:
            rows = cfg.padded_vocab_size(t) // t
            # fp32 softmax of the logits (+ the low-precision logits when not fp32),
            # and the output layer's weight gradient before it joins the fp32 buffer
            logits = s * b * rows * (4 + (param_bytes if param_bytes != 4 else 0)) \
                + rows * h * 4 + final_norm
        results.append(Memory(
            weights=params * param_bytes, gradients=params * 4.0,
            optimizer=params * optimizer_bytes / (lay.dp * lay.cp if lay.distributed_optimizer
                                                  else 1),
            # the logits are freed before the backward reaches the recomputed layers
            activations=acts, transient=max(logits, recompute_buffer),
            stage="first" if first else "last" if last else "second"))
    return max(results, key=lambda m: m.total)


# ---- the check before a run ---------------------------------------------------------------
# Per-process memory besides the tensors on CPU: Python, torch, megatron-core and allocator
# caches (peak RSS of the tiny preset's benchmark: 1.06 GB, README "Measured on CPU").
PROCESS_OVERHEAD_BYTES = 1.0 * GB
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def run_memory(cfg, world_size: int, on_gpu: bool) -> Memory:
    """Predicted bytes per rank of the `TrainConfig` ``cfg`` on ``world_size`` ranks."""
    layout = cfg.layout
    dp = layout.dp(world_size)
    lay = PlanLayout(tp=layout.tp, pp=layout.pp, dp=dp, vp=layout.vp, sp=layout.sp,
                     micro_batch=cfg.micro_batch, recompute=cfg.recompute, cp=layout.cp,
                     first_stage_layers=layout.first_stage_layers,
                     last_stage_layers=layout.last_stage_layers,
                     ends_as_layers=layout.embedding_and_loss_as_layers)
    microbatches = max(1, cfg.global_batch // (cfg.micro_batch * dp))
    mem = memory_per_gpu(cfg.model, lay, cfg.seq_length, microbatches,
                         param_bytes=PARAM_BYTES[cfg.dtype])
    if cfg.engine == "deepspeed":  # ZeRO-1 shards like the distributed optimizer; 2 and 3 more
        if cfg.zero_stage >= 2:
            mem.gradients /= dp
        if cfg.zero_stage >= 3:
            mem.weights /= dp
        if cfg.offload_optimizer and on_gpu:
            mem.optimizer = 0.0  # in host memory
    return mem


def local_ranks(world_size: int) -> int:
    """Ranks on this host: torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node, or all."""
    import os

    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if tasks:
        return int(tasks.split("(")[0].split(",")[0])
    return world_size


def available_bytes(ranks_here: int) -> tuple[float, str]:
    """(bytes one rank may use, where they come from): a GPU's free memory, or this host's
    available RAM shared by its ranks."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return float(free), f"{free / GB:.1f} GB free on the GPU"
    import psutil

    free = psutil.virtual_memory().available
    share = f"shared by {ranks_here} ranks" if ranks_here > 1 else "for 1 rank"
    return free / ranks_here, f"{free / GB:.1f} GB of RAM available on this host, {share}"


def _fits(cfg, world_size: int, budget: float, on_gpu: bool) -> bool:
    overhead = 0.0 if on_gpu else PROCESS_OVERHEAD_BYTES
    return run_memory(cfg, world_size, on_gpu).total + overhead <= budget


def _alternatives(cfg, world_size: int, budget: float, on_gpu: bool) -> Optional[str]:
    """The first change of flags (fewest changed first) under which the run would fit."""
    import dataclasses
    import itertools

    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    options = []
    for tp, pp, recompute, micro in itertools.product(
            divisors, divisors, ("none", "selective", "full"), sorted({1, cfg.micro_batch})):
        if world_size % (tp * pp * cfg.layout.cp):
            continue
        # the run's CP and end-stage options kept; VP dropped (it only adds memory)
        layout = dataclasses.replace(cfg.layout, tp=tp, pp=pp, vp=None,
                                     sp=tp > 1 and cfg.layout.sp)
        try:
            layout.check(cfg.model, world_size)
        except ConfigError:
            continue
        dp = layout.dp(world_size)
        if cfg.global_batch % (micro * dp):
            continue
        candidate = dataclasses.replace(cfg, layout=layout, recompute=recompute,
                                        micro_batch=micro)
        flags = [f for f, changed in ((f"--tp {tp}", tp != cfg.layout.tp),
                                      (f"--pp {pp}", pp != cfg.layout.pp),
                                      (f"--recompute {recompute}", recompute != cfg.recompute),
                                      (f"--micro-batch {micro}", micro != cfg.micro_batch))
                 if changed]
        if flags and _fits(candidate, world_size, budget, on_gpu):
            # the smallest change: fewest flags, least model parallelism, least recompute
            rank = ("none", "selective", "full").index(recompute)
            options.append((len(flags), tp * pp, rank, -micro, flags))
    if not options:
        return None
    return " ".join(min(options)[-1])


def check_memory_fits(cfg, world_size: int, ranks_here: Optional[int] = None) -> None:
    """Refuse, with one line, a run whose predicted memory per rank exceeds this host's.

    The line gives the prediction by kind, what this host has, and the flags under which the
    run would fit (or that none do with this many ranks)."""
    import torch

    on_gpu = torch.cuda.is_available()
    ranks_here = ranks_here or local_ranks(world_size)
    budget, where = available_bytes(ranks_here)
    if _fits(cfg, world_size, budget, on_gpu):
        return
    mem = run_memory(cfg, world_size, on_gpu)
    parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in (
        ("weights", mem.weights), ("gradients", mem.gradients), ("optimizer", mem.optimizer),
        ("activations", mem.activations + mem.transient)))
    extra = "" if on_gpu else f" + {PROCESS_OVERHEAD_BYTES / GB:.0f} GB per process"
    alternative = _alternatives(cfg, world_size, budget, on_gpu)
    advice = (f"it would fit with {alternative}" if alternative else
              f"no layout of {world_size} rank(s) fits: use more GPUs/hosts or a smaller model")
    raise ConfigError(f"not enough memory: about {mem.total / GB:.1f} GB per rank ({parts} GB"
                      f"{extra}) but {where}; {advice} (--skip-memory-check starts anyway)")
