"""`megatron-llama plan`: memory, communication, time and energy of a cluster layout (pure math).

No torch, no megatron-core: every function maps numbers to numbers, so a 2048-GPU plan runs
anywhere and is tested exactly. Notation: s sequence, b micro batch, h dim, a heads, f SwiGLU
width, V vocabulary, L layers, t TP, p PP, v VP, d DP, m microbatches per pipeline, B bytes
per activation element.

Memory per GPU is `training.memory.memory_per_gpu` (also what `pretrain` checks before it
starts).
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
from megatron_llama.model.config import LlamaConfig
from megatron_llama.model.presets import get_preset
from megatron_llama.training.memory import (  # noqa: F401
    Memory,
    PlanLayout,
    activation_units,
    memory_per_gpu,
    stage_params,
)

PUE = 1.1                 # paper, Table 15
# Fraction of the dense peak the matmuls and attention reach. Calibrated on the one
# throughput the paper measured: 65B at 380 tokens/s/GPU on 2048 A100-80GB (section 2.4).
# At 0.59 the chosen 65B layout predicts 381; the GPU-hours of Table 15 then come out within
# 3 % for 13B/33B/65B and 16 % low for 7B (its layout in the paper is not given).
DEFAULT_EFFICIENCY = 0.59
H100_EFFICIENCY = 0.76
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
    efficiency: float = DEFAULT_EFFICIENCY  # fraction of the peak the kernels reach


GPUS = {
    "a100-80gb": GPUSpec("A100-SXM4-80GB", 312.0, 80.0, 400.0, 240.0, 25.0, efficiency=DEFAULT_EFFICIENCY),
    "a100-40gb": GPUSpec("A100-SXM4-40GB", 312.0, 40.0, 400.0, 240.0, 25.0, efficiency=DEFAULT_EFFICIENCY),
    # H100: fitted to the Llama 3 paper's Table 4 (405B on 8,192 and 16,384 GPUs at 8k and
    # 128k context: 430 / 400 / 380 TFLOPs/GPU), least worst-case error: -4 %, -6 %, +6 %
    "h100-80gb": GPUSpec("H100-SXM5-80GB", 989.0, 80.0, 700.0, 370.0, 50.0,
                         efficiency=H100_EFFICIENCY),
}


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
              efficiency: Optional[float] = None, param_bytes: int = 2) -> StepTime:
    """Predicted seconds per step of ``global_batch`` sequences on ``lay``.

    Context parallelism: each rank computes s / cp of every sequence (causal attention
    load-balanced, as megatron-core splits it into 2 cp chunks), its ring passes K and V
    around the CP group behind the attention compute, and gradients reduce over DP x CP.
    Uneven stages: the slowest stage sets the pace.
    """
    s, b, h, t, p, d, c = seq, lay.micro_batch, cfg.dim, lay.tp, lay.pp, lay.dp, lay.cp
    m = global_batch // (b * d)
    vp = lay.vp or 1
    rate = gpu.peak_tflops * 1e12 * (gpu.efficiency if efficiency is None else efficiency)
    # forward FLOPs of one layer for one microbatch on one rank: matmuls + causal attention
    matmul = 2 * s * b * (cfg.layer_params() - 2 * h)
    attention = 2 * s * s * b * cfg.n_heads * cfg.head_dim       # QK^T and AV, causal half
    layer_fwd = (matmul + attention) / (t * c)
    extra = {"none": 0.0, "selective": attention / (t * c), "full": layer_fwd}[lay.recompute]
    layer_step = 3 * layer_fwd + extra                           # bwd = 2 x fwd
    logits = 3 * 2 * s * b * h * cfg.padded_vocab_size(t) / (t * c)  # last stage only
    counts = lay.stage_layers(cfg.n_layers)
    stage_flops = [n * layer_step + (logits if i == p - 1 else 0.0) for i, n in enumerate(counts)]
    stage_micro = max(stage_flops) / rate                        # the slowest stage
    compute = m * stage_micro
    bubble = (p - 1) / vp * stage_micro
    layers = max(counts)
    # TP: all-reduce (or all-gather + reduce-scatter with SP, the same bytes) of [s/c, b, h]:
    # 2 in forward, 2 in backward, 2 more when the forward is recomputed
    tp_msgs = 4 + (2 if lay.recompute == "full" else 0)
    tp_bytes = 0.0
    if t > 1:
        tp_bytes = tp_msgs * 2 * (t - 1) / t * s / c * b * h * param_bytes * layers * m
    tp_bw = gpu.intra_gbps if t <= gpu.gpus_per_node else gpu.inter_gbps
    tp_comm = tp_bytes / (tp_bw * GB)
    # CP: each rank's K and V shard ([s/c, b, kv/t]) visits the c - 1 others in forward,
    # K, V and their gradients in backward; exposed only beyond the attention it overlaps
    cp_comm, cp_bytes = 0.0, 0.0
    if c > 1:
        kv = 2 * cfg.num_kv_heads * cfg.head_dim / t
        per_layer = 3 * (c - 1) * s / c * b * kv * param_bytes
        cp_bytes = per_layer * layers * m
        cp_bw = gpu.intra_gbps if t * c <= gpu.gpus_per_node else gpu.inter_gbps
        hidden = 3 * attention / (t * c) / rate
        cp_comm = max(0.0, per_layer / (cp_bw * GB) - hidden) * layers * m
    # DP: reduce-scatter of fp32 grads + all-gather of weights (distributed optimizer), or an
    # all-reduce of fp32 grads, over DP x CP; overlapped with the last microbatch's backward
    # and the first microbatch's forward
    params = stage_params(cfg, t, p, True, p == 1, counts[0])
    group = d * c
    frac = (group - 1) / group
    if lay.distributed_optimizer:
        rs, ag = frac * params * 4, frac * params * param_bytes
    else:
        rs, ag = 2 * frac * params * 4, 0.0
    # megatron-core orders ranks TP fastest, then CP, DP, PP: a DP x CP group spans t*c*d
    # consecutive ranks and leaves the node (NVLink) as soon as that exceeds a node
    dp_bw = gpu.intra_gbps if t * group <= gpu.gpus_per_node else gpu.inter_gbps
    fwd_micro = stage_micro / 3
    dp_comm = max(0.0, rs / (dp_bw * GB) - 2 * fwd_micro) + max(0.0, ag / (dp_bw * GB) - fwd_micro)
    # PP: activations forward and their gradients backward, at every chunk boundary
    pp_bytes = 0.0
    if p > 1:
        pp_bytes = 2 * m * vp * s / c * b * h * param_bytes / (t if lay.sp else 1)
    pp_bw = gpu.intra_gbps if t * group * p <= gpu.gpus_per_node else gpu.inter_gbps
    pp_comm = pp_bytes / (pp_bw * GB)
    return StepTime(compute, bubble, tp_comm + cp_comm, dp_comm, pp_comm,
                    {"tp": tp_bytes, "cp": cp_bytes, "dp": rs + ag, "pp": pp_bytes})


# ---- enumeration and ranking ---------------------------------------------------------------
@dataclass
class Candidate:
    layout: PlanLayout
    memory: Memory
    time: StepTime
    tokens_per_s_per_gpu: float
    mfu: float                 # PaLM's model FLOPs (attention counted in full)
    fits: bool
    tflops_per_gpu: float = 0.0  # megatron-core's count (causal attention as half), Llama 3's


def balanced_ends(n_layers: int, pp: int) -> Optional[int]:
    """Layers on the first and last stages when ``pp`` does not divide ``n_layers``: the
    largest k with the middle stages even and no lighter than k (126 on 16: 7, as Llama 3)."""
    if pp < 3:
        return None
    for k in range(n_layers // pp, 0, -1):
        middle = n_layers - 2 * k
        if middle % (pp - 2) == 0 and middle // (pp - 2) >= k:
            return k
    return None


def legal_layouts(cfg: LlamaConfig, gpus: int, global_batch: int, seq: int,
                  gpus_per_node: int = 8, micro_batches=(1, 2, 4),
                  max_vp: int = 4) -> list[PlanLayout]:
    """Every layout `ParallelLayout.check` accepts for ``gpus`` (TP within a node): pipeline
    sizes that divide the layers, and powers of two with lighter first and last stages (the
    embedding and loss counted as layers, else `balanced_ends`); context parallelism from
    32k-token sequences on."""
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node]
    # (pp, layers on each end stage, embedding and loss counted as layers)
    pps: list[tuple[int, Optional[int], bool]] = [
        (p, None, False) for p in range(1, cfg.n_layers + 1) if cfg.n_layers % p == 0 and p <= 64]
    for p in (4, 8, 16, 32, 64):
        if cfg.n_layers % p == 0:
            continue
        if (cfg.n_layers + 2) % p == 0:
            pps.append((p, None, True))
        elif balanced_ends(cfg.n_layers, p):
            pps.append((p, balanced_ends(cfg.n_layers, p), False))
    cps = [c for c in (1, 2, 4, 8, 16) if c == 1 or (seq >= 32768 and seq % (2 * c) == 0)]
    for t, (p, ends, as_layers), c in itertools.product(tps, pps, cps):
        if gpus % (t * p * c):
            continue
        d = gpus // (t * p * c)
        vps = [None] + [v for v in range(2, max_vp + 1) if p > 1]
        for vp, sp, mb, rc, dopt in itertools.product(vps, (False, True), micro_batches,
                                                      ("none", "selective", "full"),
                                                      (True, False)):
            lay = PlanLayout(t, p, d, vp, sp, mb, rc, dopt, c, ends, ends, as_layers)
            try:
                lay.parallel().check(cfg, gpus, mb, global_batch)
            except ConfigError:
                continue
            if (sp and (seq // c) % t) or seq % (2 * c if c > 1 else 1):
                continue
            out.append(lay)
    return out


def evaluate(cfg: LlamaConfig, lay: PlanLayout, seq: int, global_batch: int, gpu: GPUSpec,
             efficiency: Optional[float] = None, reserve_gb: float = 4.0) -> Candidate:
    from megatron_llama.training.metrics import flops_per_token

    mem = memory_per_gpu(cfg, lay, seq, global_batch // (lay.micro_batch * lay.dp))
    tm = step_time(cfg, lay, seq, global_batch, gpu, efficiency)
    tok = global_batch * seq / tm.total / lay.gpus
    mfu = tok * flops_per_token(cfg, seq) / (gpu.peak_tflops * 1e12)
    tflops = tok * flops_per_token(cfg, seq, causal_half=True) / 1e12
    return Candidate(lay, mem, tm, tok, mfu, mem.total <= (gpu.memory_gb - reserve_gb) * GB,
                     tflops)


def plan(cfg: LlamaConfig, gpus: int, gpu: GPUSpec, seq: int, global_batch: int,
         efficiency: Optional[float] = None, reserve_gb: float = 4.0) -> list[Candidate]:
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
