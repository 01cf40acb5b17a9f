"""`megatron-llama plan`: memory, communication, time and energy of a cluster layout (pure math).

No torch, no megatron-core: every function maps numbers to numbers, so a 2048-GPU plan runs
anywhere and is tested exactly. Notation: s sequence, b micro batch, h dim, a heads, f SwiGLU
width, V vocabulary, L layers, t TP, p PP, v VP, d DP, m microbatches per pipeline, B bytes
per activation element.

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
Time per step: FLOPs at ``efficiency`` x peak, the pipeline bubble, tensor-parallel
collectives on the critical path, the data-parallel reduce-scatter / all-gather minus what
hides behind the last microbatch's backward / the first one's forward, and pipeline p2p.
Energy follows the paper's Table 15: MWh = GPU-hours x GPU power x PUE 1.1 / 1e6,
tCO2eq = MWh x 0.385.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig, get_preset
from megatron_llama.parallel import ParallelLayout

PUE = 1.1                 # paper, Table 15
# Fraction of the dense peak the matmuls and attention reach. Calibrated on the one
# throughput the paper measured: 65B at 380 tokens/s/GPU on 2048 A100-80GB (section 2.4).
# At 0.59 the chosen 65B layout predicts 381; the GPU-hours of Table 15 then come out within
# 3 % for 13B/33B/65B and 16 % low for 7B (its layout in the paper is not given).
DEFAULT_EFFICIENCY = 0.59
TCO2_PER_MWH = 0.385      # paper: US national average carbon intensity, tCO2eq / MWh
GB = 1e9


@dataclass(frozen=True)
class GPUSpec:
    """A GPU with what the time model needs; bandwidths are achievable per-GPU bus rates."""

    name: str
    peak_tflops: float      # dense bf16
    memory_gb: float
    power_w: float          # the paper's power figure for the energy estimate
    intra_gbps: float       # NVLink collective bus bandwidth per GPU, GB/s
    inter_gbps: float       # network per GPU (one NIC each), GB/s
    gpus_per_node: int = 8


GPUS = {
    "a100-80gb": GPUSpec("A100-SXM4-80GB", 312.0, 80.0, 400.0, 240.0, 25.0),
    "a100-40gb": GPUSpec("A100-SXM4-40GB", 312.0, 40.0, 400.0, 240.0, 25.0),
    "h100-80gb": GPUSpec("H100-SXM5-80GB", 989.0, 80.0, 700.0, 370.0, 50.0),
}


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

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def __post_init__(self) -> None:
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"recompute must be none, selective or full, not {self.recompute!r}")
        for name in ("tp", "pp", "dp", "micro_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")

    def parallel(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, vp=self.vp, sp=self.sp)

    def describe(self) -> str:
        vp = f" VP={self.vp}" if self.vp else ""
        return (f"TP={self.tp}{'+SP' if self.sp else ''} PP={self.pp}{vp} DP={self.dp} "
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


# ---- memory -----------------------------------------------------------------------------
def stage_params(cfg: LlamaConfig, tp: int, pp: int, first: bool, last: bool) -> int:
    """Parameters one GPU holds on a first / last pipeline stage (padded vocab, TP slice)."""
    h, layers = cfg.dim, cfg.n_layers // pp
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
    """Predicted peak bytes per GPU for ``lay`` (see the module docstring), worst stage."""
    act_bytes = act_bytes or param_bytes
    h, s, b, t, p = cfg.dim, seq, lay.micro_batch, lay.tp, lay.pp
    sbh = s * b * h
    layers = cfg.n_layers // p
    in_flight = min(p, microbatches)
    if lay.vp and lay.vp > 1:
        in_flight *= 1 + (p - 1) / (p * lay.vp)
    full_layer = activation_units(cfg, t, lay.sp, "none") * sbh * act_bytes
    per_layer = activation_units(cfg, t, lay.sp, lay.recompute) * sbh * act_bytes
    final_norm = 3 * sbh * act_bytes / (t if lay.sp else 1)
    recompute_buffer = full_layer if lay.recompute == "full" else 0.0
    optimizer_bytes = 8 + (4 if param_bytes != 4 else 0)
    results = []
    for first, last in {(True, p == 1), (p == 1, True)}:
        params = stage_params(cfg, t, p, first, last)
        # the last stage holds one microbatch's activations at its peak (1F1B), the first p
        stage_in_flight = in_flight if first else 1
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
            optimizer=params * optimizer_bytes / (lay.dp if lay.distributed_optimizer else 1),
            # the logits are freed before the backward reaches the recomputed layers
            activations=acts, transient=max(logits, recompute_buffer),
            stage="first" if first else "last"))
    return max(results, key=lambda m: m.total)


# ---- time and communication --------------------------------------------------------------
@dataclass
class StepTime:
    compute: float
    bubble: float
    tp_comm: float
    dp_comm: float          # exposed part
    pp_comm: float
    comm_bytes: dict = field(default_factory=dict)  # per GPU per step

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.dp_comm + self.pp_comm


def step_time(cfg: LlamaConfig, lay: PlanLayout, seq: int, global_batch: int, gpu: GPUSpec,
              efficiency: float = DEFAULT_EFFICIENCY, param_bytes: int = 2) -> StepTime:
    """Predicted seconds per step of ``global_batch`` sequences on ``lay``."""
    s, b, h, t, p, d = seq, lay.micro_batch, cfg.dim, lay.tp, lay.pp, lay.dp
    m = global_batch // (b * d)
    vp = lay.vp or 1
    rate = gpu.peak_tflops * 1e12 * efficiency
    # forward FLOPs of one layer for one microbatch on one TP rank: matmuls + causal attention
    matmul = 2 * s * b * (cfg.layer_params() - 2 * h)
    attention = 2 * s * s * b * cfg.n_heads * cfg.head_dim       # QK^T and AV, causal half
    layer_fwd = (matmul + attention) / t
    extra = {"none": 0.0, "selective": attention / t, "full": layer_fwd}[lay.recompute]
    layer_step = 3 * layer_fwd + extra                           # bwd = 2 x fwd
    logits = 3 * 2 * s * b * h * cfg.padded_vocab_size(t) / t    # last stage only
    stage_micro = ((cfg.n_layers // p) * layer_step + logits) / rate  # slowest stage
    compute = m * stage_micro
    bubble = (p - 1) / vp * stage_micro
    # TP: all-reduce (or all-gather + reduce-scatter with SP, the same bytes) of [s, b, h]:
    # 2 in forward, 2 in backward, 2 more when the forward is recomputed
    tp_msgs = 4 + (2 if lay.recompute == "full" else 0)
    tp_bytes = 0.0
    if t > 1:
        tp_bytes = tp_msgs * 2 * (t - 1) / t * s * b * h * param_bytes * (cfg.n_layers // p) * m
    tp_bw = gpu.intra_gbps if t <= gpu.gpus_per_node else gpu.inter_gbps
    tp_comm = tp_bytes / (tp_bw * GB)
    # DP: reduce-scatter of fp32 grads + all-gather of weights (distributed optimizer), or an
    # all-reduce of fp32 grads; overlapped with the last microbatch's backward and the first
    # microbatch's forward
    params = stage_params(cfg, t, p, True, p == 1)
    frac = (d - 1) / d
    if lay.distributed_optimizer:
        rs, ag = frac * params * 4, frac * params * param_bytes
    else:
        rs, ag = 2 * frac * params * 4, 0.0
    # megatron-core orders ranks TP fastest, then DP, then PP: a DP group spans t*d
    # consecutive ranks and leaves the node (NVLink) as soon as t*d exceeds a node
    dp_bw = gpu.intra_gbps if t * d <= gpu.gpus_per_node else gpu.inter_gbps
    fwd_micro = stage_micro / 3
    dp_comm = max(0.0, rs / (dp_bw * GB) - 2 * fwd_micro) + max(0.0, ag / (dp_bw * GB) - fwd_micro)
    # PP: activations forward and their gradients backward, at every chunk boundary
    pp_bytes = 0.0
    if p > 1:
        pp_bytes = 2 * m * vp * s * b * h * param_bytes / (t if lay.sp else 1)
    pp_bw = gpu.intra_gbps if t * d * p <= gpu.gpus_per_node else gpu.inter_gbps
    pp_comm = pp_bytes / (pp_bw * GB)
    return StepTime(compute, bubble, tp_comm, dp_comm, pp_comm,
                    {"tp": tp_bytes, "dp": rs + ag, "pp": pp_bytes})


# ---- enumeration and ranking ---------------------------------------------------------------
@dataclass
class Candidate:
    layout: PlanLayout
    memory: Memory
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    fits: bool


def legal_layouts(cfg: LlamaConfig, gpus: int, global_batch: int, seq: int,
                  gpus_per_node: int = 8, micro_batches=(1, 2, 4),
                  max_vp: int = 4) -> list[PlanLayout]:
    """Every layout `ParallelLayout.check` accepts for ``gpus`` (TP within a node)."""
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node]
    pps = [p for p in range(1, cfg.n_layers + 1) if cfg.n_layers % p == 0 and p <= 64]
    for t, p in itertools.product(tps, pps):
        if gpus % (t * p):
            continue
        d = gpus // (t * p)
        vps = [None] + [v for v in range(2, max_vp + 1) if p > 1]
        for vp, sp, mb, rc, dopt in itertools.product(vps, (False, True), micro_batches,
                                                      ("none", "selective", "full"),
                                                      (True, False)):
            lay = PlanLayout(t, p, d, vp, sp, mb, rc, dopt)
            try:
                lay.parallel().check(cfg, gpus, mb, global_batch)
            except ConfigError:
                continue
            if sp and seq % t:
                continue
            out.append(lay)
    return out


def evaluate(cfg: LlamaConfig, lay: PlanLayout, seq: int, global_batch: int, gpu: GPUSpec,
             efficiency: float = DEFAULT_EFFICIENCY, reserve_gb: float = 4.0) -> Candidate:
    from megatron_llama.training.metrics import flops_per_token

    mem = memory_per_gpu(cfg, lay, seq, global_batch // (lay.micro_batch * lay.dp))
    tm = step_time(cfg, lay, seq, global_batch, gpu, efficiency)
    tok = global_batch * seq / tm.total / lay.gpus
    mfu = tok * flops_per_token(cfg, seq) / (gpu.peak_tflops * 1e12)
    return Candidate(lay, mem, tm, tok, mfu, mem.total <= (gpu.memory_gb - reserve_gb) * GB)


def plan(cfg: LlamaConfig, gpus: int, gpu: GPUSpec, seq: int, global_batch: int,
         efficiency: float = DEFAULT_EFFICIENCY, reserve_gb: float = 4.0) -> list[Candidate]:
    """All legal layouts: those that fit first, then by predicted tokens/s/GPU, then memory."""
    cands = [evaluate(cfg, lay, seq, global_batch, gpu, efficiency, reserve_gb)
             for lay in legal_layouts(cfg, gpus, global_batch, seq, gpu.gpus_per_node)]
    if not cands:
        raise ConfigError(f"no legal layout of {gpus} GPUs for this model and batch")
    # ties (SP costs no time in this model) go to the layout with less memory
    return sorted(cands, key=lambda c: (not c.fits, -round(c.tokens_per_s_per_gpu, 1),
                                        c.memory.total))


def budget(tokens: float, tokens_per_s_per_gpu: float, gpus: int, power_w: float,
           pue: float = PUE, tco2_per_mwh: float = TCO2_PER_MWH) -> dict:
    """Days, GPU-hours, MWh and tCO2eq to train on ``tokens`` (the paper's Table 15 formula)."""
    if tokens_per_s_per_gpu <= 0:
        raise ConfigError("tokens/s/GPU must be positive")
    gpu_hours = tokens / tokens_per_s_per_gpu / 3600
    mwh = gpu_hours * power_w * pue / 1e6
    return {"tokens": tokens, "tokens_per_s_per_gpu": tokens_per_s_per_gpu, "gpus": gpus,
            "days": gpu_hours / gpus / 24, "gpu_hours": gpu_hours, "mwh": mwh,
            "tco2eq": mwh * tco2_per_mwh}


def resolve(preset: str, gpu: str) -> tuple:
    """(preset, GPUSpec) by name, refusing unknown ones with one line."""
    if gpu.lower() not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; choose from {', '.join(GPUS)}")
    return get_preset(preset), GPUS[gpu.lower()]
