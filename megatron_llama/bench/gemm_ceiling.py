"""The matrix multiplications of one training step, at the model's own shapes, timed alone.

On CPU the benchmark's peak is a square fp32 GEMM (1024^3) measured in the same run. A
LLaMA layer does not multiply square matrices: its GEMMs are tall and thin ([tokens, dim] x
[dim, 3 dim / TP] and so on), in three layouts (forward x W^T, input gradient g W, weight
gradient g^T x), and a CPU BLAS runs some of them slower than 1024^3. To say how much of the
gap between model FLOP/s and the GEMM peak is the training step's own overhead (attention,
elementwise work, optimizer, communication) and how much is the GEMM shapes, the benchmark
times exactly these GEMMs alone, with nothing else running in the process: their FLOP/s is
the ceiling a perfect step of this model could reach on this CPU.

`step_gemms` is pure shape arithmetic (tested: its FLOPs are exactly 6 x the matmul
parameters x tokens, the output layer counted over the padded vocabulary); `measure_step_gemms`
times them. With PP > 1 every rank times the whole model's mix: a rate, not a stage's time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from megatron_llama.model.config import LlamaConfig

# How megatron-core's linear layers multiply (tensor_parallel/layers.py, without
# gradient-accumulation fusion): forward input @ weight.t() ("NT"), input gradient
# grad_output @ weight ("NN"), weight gradient grad_output.t() @ input ("TN").
LAYOUTS = ("NT", "NN", "TN")


@dataclass(frozen=True)
class Gemm:
    """``[m, k] x [k, n]``, ``count`` times per step on one rank, operands stored as ``layout``."""

    name: str
    m: int
    k: int
    n: int
    layout: str
    count: int

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 over the whole step."""
        return 2 * self.m * self.k * self.n * self.count


def _linear(name: str, tokens: int, fan_in: int, fan_out: int, count: int) -> list[Gemm]:
    # weight [fan_out, fan_in]; forward [T, in] x [in, out]; dgrad [T, out] x [out, in];
    # wgrad [out, T] x [T, in]
    return [Gemm(f"{name} forward", tokens, fan_in, fan_out, "NT", count),
            Gemm(f"{name} input grad", tokens, fan_out, fan_in, "NN", count),
            Gemm(f"{name} weight grad", fan_out, tokens, fan_in, "TN", count)]


def step_gemms(cfg: LlamaConfig, tp: int, micro_batch: int, seq_length: int,
               microbatches: int = 1) -> list[Gemm]:
    """Every GEMM of one training step of the whole model, as one tensor-parallel rank sees it.

    Per layer (TP-sharded as megatron-core shards them): the fused QKV projection (column
    parallel), the attention output projection (row parallel), the fused SwiGLU fc1 (w1 and
    w3, column parallel), fc2 (w2, row parallel); then the output layer over the padded
    vocabulary. Attention's own batched products (QK^T, PV) are not GEMMs of weights and are
    left out. Pipeline stages split the layers but not the shapes, so PP does not appear.
    """
    tokens = micro_batch * seq_length
    d, hd = cfg.dim, cfg.head_dim
    qkv = (cfg.n_heads + 2 * cfg.num_kv_heads) * hd // tp
    count = cfg.n_layers * microbatches
    gemms = (_linear("qkv", tokens, d, qkv, count)
             + _linear("attention out", tokens, cfg.n_heads * hd // tp, d, count)
             + _linear("fc1 (w1, w3)", tokens, d, 2 * cfg.ffn_hidden_size // tp, count)
             + _linear("fc2 (w2)", tokens, cfg.ffn_hidden_size // tp, d, count)
             + _linear("output", tokens, d, cfg.padded_vocab_size(tp) // tp, microbatches))
    return gemms


def _operands(g: Gemm):
    import torch

    a = torch.randn(g.k, g.m).t() if g.layout == "TN" else torch.randn(g.m, g.k)
    b = torch.randn(g.n, g.k).t() if g.layout == "NT" else torch.randn(g.k, g.n)
    return a, b, torch.empty(g.m, g.n)


def measure_step_gemms(gemms: list[Gemm], repeats: int = 3) -> dict:
    """Time each distinct GEMM alone (median of ``repeats`` after one warm-up call).

    Returns ``{"seconds": time of all the step's GEMMs, "tflops": their FLOP/s / 1e12,
    "per_gemm": [...]}``. Outputs are preallocated, so page faults of fresh outputs are not
    counted: this is the GEMM rate alone. Call it on all ranks at once (they share cores).
    """
    import torch

    per_gemm, total_s, total_flops = [], 0.0, 0
    for g in gemms:
        a, b, out = _operands(g)
        torch.mm(a, b, out=out)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            samples.append(time.perf_counter() - start)
        del a, b, out
        seconds = statistics.median(samples)
        total_s += seconds * g.count
        total_flops += g.flops
        per_gemm.append({"name": g.name, "shape": [g.m, g.k, g.n], "layout": g.layout,
                         "count": g.count, "gflops": 2 * g.m * g.k * g.n / seconds / 1e9})
    return {"seconds": total_s, "tflops": total_flops / total_s / 1e12, "per_gemm": per_gemm}


# what an op is, for `step_time_breakdown`: GEMMs by exact name, the rest by substring
# (batched products only appear in attention: QK^T and PV when it runs unfused)
_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_"}
_KINDS = (("attention", "scaled_dot_product"), ("attention", "aten::bmm"),
          ("attention", "aten::baddbmm"), ("optimizer", "aten::_fused_adam"),
          ("optimizer", "aten::_foreach_"), ("communication", "c10d::"),
          ("communication", "gloo:"), ("communication", "record_param_comms"),
          # megatron-core's TP/SP autograd functions: their self time is the collective
          ("communication", "ModelParallelRegion"),
          ("communication", "SequenceParallelRegion"))


def _kind(name: str) -> str:
    if name in _GEMM_OPS:
        return "GEMMs"
    return next((kind for kind, key in _KINDS if key in name), "other")


def step_time_breakdown(step, top_other: int = 5) -> dict:
    """Run ``step()`` once under torch's CPU profiler; seconds of self time by kind.

    Kinds: GEMMs (mm/addmm), attention (SDPA kernels and their backward, or bmm/baddbmm when
    attention runs unfused), optimizer
    (fused AdamW / foreach), communication (c10d collectives), other (everything else:
    norms, SwiGLU, RoPE, softmax/cross entropy, copies, gradient-buffer zeroing, Python).
    Profiling slows small ops a little, so "other" errs high. ``top_other_s`` names the
    ``top_other`` ops that cost most inside "other". CPU only.
    """
    from megatron_llama.bench.memtrace import profiled

    start = time.perf_counter()
    prof = profiled(step)
    wall = time.perf_counter() - start
    seconds = dict.fromkeys(("GEMMs", "attention", "optimizer", "communication", "other"), 0.0)
    other: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep") or event.key.startswith("##"):
            continue
        kind, sec = _kind(event.key), event.self_cpu_time_total / 1e6
        seconds[kind] += sec
        if kind == "other":
            other[event.key] = sec
    top = sorted(other.items(), key=lambda kv: -kv[1])[:top_other]
    return {"wall_s": wall, "self_s": seconds, "top_other_s": dict(top)}
