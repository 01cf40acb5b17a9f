"""`megatron-llama benchmark`: training throughput in tokens/s/GPU, TFLOP/s/GPU and MFU.

The real thing on synthetic tokens: megatron-core GPTModel with LLaMA's spec, its DDP with
the gradient reduce-scatter overlapped with the backward pass, the distributed AdamW of the
paper's recipe (clipping 1.0), the layout's forward-backward schedule. ``warmup`` steps are
run and dropped, then ``iters`` steps are timed end to end (data, forward, backward,
communication, optimizer), each between two barriers; a step's time is the slowest rank's.

Reported: tokens/s/GPU (a "GPU" is a rank), TFLOP/s/GPU and MFU by two FLOP counts,
- PaLM (Chowdhery et al. 2022, app. B):     6 N + 12 L H Q T per token,
- megatron-core's causal count:             6 N + 6 L H Q T (causal attention counted half),
with N the parameters without the input embedding; step time mean / median / p90; peak
memory per rank (`memtrace`); the full layout. The peak is a known GPU's dense bf16 number,
``--peak-tflops``, or on CPU the fp32 GEMM throughput measured *in the same run*: a short GEMM
window after every timed step, on every rank at once, best window per rank. On a shared
machine that is the least-contended moment, so CPU MFU errs low, never high.

With ``--compare-hf`` (single process) the same shapes are also trained with Hugging Face
transformers (`hf_compare.HFTrainer`), one step of each in turn, so background load hits both.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout

PALM_FORMULA = "6N + 12*L*H*Q*T per token (PaLM; N without input embedding)"
MEGATRON_FORMULA = "6N + 6*L*H*Q*T per token (megatron-core: causal attention counted half)"


@dataclass
class BenchConfig:
    """One benchmark point. ``world`` = TP x PP x DP local processes."""

    model: LlamaConfig
    preset: str = "tiny"
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    dp: int = 1
    seq_length: int = 256
    micro_batch: int = 4
    global_batch: Optional[int] = None  # sequences per step; default micro x DP (x 2PP if PP)
    recompute: str = "none"
    dtype: str = "fp32"
    warmup: int = 2
    iters: int = 5
    threads: int = 0                    # total across ranks; 0 = all cores
    compare_hf: bool = False
    peak_tflops: Optional[float] = None
    gemm_size: int = 1024
    measure_memory: bool = True
    compile: bool = False               # torch.compile'd SwiGLU (megatron-core's fused kernel)
    progress: bool = False              # a bar on rank 0 (stderr) over warmup + timed steps
    seed: int = 1234

    @property
    def world(self) -> int:
        return self.layout.tp * self.layout.pp * self.dp

    @property
    def batch(self) -> int:
        if self.global_batch:
            return self.global_batch
        return self.micro_batch * self.dp * (2 * self.layout.pp if self.layout.pp > 1 else 1)

    def check(self) -> None:
        if self.warmup < 0 or self.iters < 1:
            raise ConfigError("need --warmup >= 0 and --iters >= 1")
        self._train_config().check(self.world)
        if self.compare_hf and self.world != 1:
            raise ConfigError("--compare-hf needs a single process (TP=PP=DP=1): transformers "
                              "trains on one process")

    def _train_config(self):
        from megatron_llama.training.recipe import TrainConfig

        return TrainConfig(model=self.model, layout=self.layout, seq_length=self.seq_length,
                           micro_batch=self.micro_batch, global_batch=self.batch,
                           train_steps=10**9, warmup_steps=0, dtype=self.dtype,
                           recompute=self.recompute, seed=self.seed)


def _gemm_window(size: int) -> float:
    from megatron_llama.training.metrics import measure_cpu_gemm_tflops

    return measure_cpu_gemm_tflops(size, windows=1, seconds=0.25)


def run_rank(bc: BenchConfig) -> dict:
    """Warmup + timed steps on this rank (torch.distributed initialised). Raw numbers."""
    import time

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_llama.bench.memtrace import (
        peak_rss_bytes,
        static_tensor_bytes,
        step_peak_bytes,
    )
    from megatron_llama.data.batches import SyntheticTokens, TrainData
    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.parallel import destroy, initialize
    from megatron_llama.training.engines.megatron_core import (
        build_optimizer,
        forward_backward,
        wrap_ddp,
    )

    cfg = bc._train_config()
    initialize(bc.layout, seed=bc.seed)
    try:
        # --compile: megatron-core's fused SwiGLU (forward and backward in one pass each, the
        # silu output not stored), compiled by torch.compile (inductor, C++ on CPU) during warmup
        extra = {"bias_activation_fusion": True} if bc.compile else {}
        tconfig = to_transformer_config(bc.model, bc.layout, dtype=bc.dtype,
                                        recompute=bc.recompute, **extra)
        chunks = wrap_ddp(build_model(bc.model, tconfig), tconfig, use_distributed_optimizer=True,
                          overlap_grad_reduce=True)
        optimizer = build_optimizer(chunks, cfg)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        steps = bc.warmup + bc.iters + 2  # + the profiled step and the memory step
        data = TrainData(SyntheticTokens(bc.model.vocab_size, bc.seq_length, steps * bc.batch,
                                         bc.seed), None, bc.batch, bc.micro_batch, dp, dp_rank)
        hf = None
        if bc.compare_hf:
            from megatron_llama.bench.hf_compare import HFTrainer
            hf = HFTrainer(bc.model, bc.seq_length, seed=bc.seed)
        state = {"step": 0, "loss": float("nan")}

        def one_step() -> None:
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            losses = forward_backward(chunks, tconfig,
                                      data.train_batches(state["step"] * bc.batch),
                                      seq_length=bc.seq_length, micro_batch_size=bc.micro_batch)
            optimizer.step()
            if losses:
                state["loss"] = float(torch.stack(losses).mean())
            state["step"] += 1

        times, hf_times, gemm = [], [], []
        hf_loss = None
        bar = tqdm(total=bc.warmup + bc.iters, unit=" step", desc="benchmark",
                   disable=not bc.progress or dist.get_rank() != 0)
        for i in range(bc.warmup + bc.iters):
            # this step's samples (the single process holds the whole global batch)
            tokens = torch.cat([b["tokens"] for b in data.train_batches(i * bc.batch)]) \
                if hf is not None else None
            # the same tokens, next to ours in time (same background load); who goes first
            # alternates, so a load trend does not favour either side
            if hf is not None and i % 2:
                hf_elapsed, hf_loss = hf.step(tokens)
            dist.barrier()
            start = time.perf_counter()
            one_step()
            elapsed = time.perf_counter() - start
            if hf is not None and not i % 2:
                hf_elapsed, hf_loss = hf.step(tokens)
            if i >= bc.warmup:
                times.append(elapsed)
                if hf is not None:
                    hf_times.append(hf_elapsed)
                if not torch.cuda.is_available():
                    dist.barrier()  # every rank multiplies at once, as they train at once
                    gemm.append(_gemm_window(bc.gemm_size))
            bar.set_postfix_str(("warmup " if i < bc.warmup else "") + f"{elapsed:.2f} s")
            bar.update(1)
        bar.close()
        # the timed steps' loss and RSS, before the extra untimed steps and GEMMs below
        loss, peak_rss = state["loss"], peak_rss_bytes()
        ceiling = breakdown = None
        if not torch.cuda.is_available():
            from megatron_llama.bench.gemm_ceiling import (
                measure_step_gemms,
                step_gemms,
                step_time_breakdown,
            )

            dist.barrier()  # all ranks at once, as in the steps
            ceiling = measure_step_gemms(step_gemms(bc.model, bc.layout.tp, bc.micro_batch,
                                                    bc.seq_length))["tflops"]
            dist.barrier()
            breakdown = step_time_breakdown(one_step)
        result = {"times": times, "hf_times": hf_times, "gemm": gemm, "loss": loss,
                  "gemm_model_shapes": ceiling, "breakdown": breakdown,
                  "hf_loss": hf_loss, "hf_version": hf.version if hf else None,
                  "threads": torch.get_num_threads(), "rank": dist.get_rank(),
                  "peak_rss": peak_rss}
        if hf is not None:
            del hf  # its memory must not count in ours
        if bc.measure_memory:
            dist.barrier()
            result["static_bytes"] = static_tensor_bytes(chunks, optimizer)
            result["step_peak_bytes"] = step_peak_bytes(one_step)
        return result
    finally:
        destroy()


def _worker(rank: int, world: int, workdir: str, bc: BenchConfig) -> dict:
    import torch

    from megatron_llama.parallel import init_distributed

    torch.set_num_threads(max(1, (bc.threads or os.cpu_count() or 1) // world))
    init_distributed()
    return run_rank(bc)


def run_benchmark(bc: BenchConfig, timeout: float = 1800.0) -> dict:
    """Run ``bc`` (in this process if world is 1, else on spawned local ranks); the report."""
    import warnings

    warnings.filterwarnings("ignore")
    bc.check()
    if bc.world == 1:
        import torch

        from megatron_llama.parallel import init_distributed

        torch.set_num_threads(bc.threads or os.cpu_count() or 1)
        init_distributed()
        per_rank = [run_rank(bc)]
    else:
        from megatron_llama.local_ranks import run_processes

        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        with tempfile.TemporaryDirectory(prefix="megatron_llama_bench_") as tmp:
            per_rank = run_processes(_worker, bc.world, tmp, bc, timeout=timeout)
    return summarize(bc, per_rank)


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p90": p90, "min": ordered[0], "all": values}


def summarize(bc: BenchConfig, per_rank: list[dict]) -> dict:
    """The report: throughput, FLOPs by both formulas, MFU, step times, memory, layout."""
    import torch

    from megatron_llama.training.metrics import flops_per_token, gpu_peak_tflops

    world = bc.world
    # A step takes as long as its slowest rank.
    times = [max(r["times"][i] for r in per_rank) for i in range(bc.iters)]
    step = _stats(times)
    tokens_per_step = bc.batch * bc.seq_length
    tok_s = tokens_per_step / step["mean"]
    tok_s_gpu = tok_s / world
    flops = {"palm": flops_per_token(bc.model, bc.seq_length),
             "megatron_causal": flops_per_token(bc.model, bc.seq_length, causal_half=True)}
    tflops = {k: tok_s_gpu * v / 1e12 for k, v in flops.items()}
    on_gpu = torch.cuda.is_available()
    gemm_best = [max(r["gemm"]) for r in per_rank if r["gemm"]]
    gemm_median = [statistics.median(r["gemm"]) for r in per_rank if r["gemm"]]
    if bc.peak_tflops:
        peak, source = bc.peak_tflops, "--peak-tflops"
    elif on_gpu:
        name = torch.cuda.get_device_name(0)
        peak, source = gpu_peak_tflops(name) or 0.0, f"{name} dense bf16"
    else:
        peak = statistics.fmean(gemm_best)
        source = (f"CPU fp32 GEMM {bc.gemm_size}^3 measured after every timed step, on all "
                  f"ranks at once (best window per rank, mean over ranks)")
    m = bc.model
    report = {
        "device": (f"CUDA {torch.cuda.get_device_name(0)}" if on_gpu else
                   f"CPU ({os.cpu_count()} cores, {per_rank[0]['threads']} thread(s) per rank)"),
        "model": {"preset": bc.preset, "dim": m.dim, "n_layers": m.n_layers,
                  "n_heads": m.n_heads, "n_kv_heads": m.num_kv_heads, "ffn": m.ffn_hidden_size,
                  "vocab_size": m.vocab_size, "params": m.num_params(),
                  "params_without_embedding": m.num_params(include_embedding=False)},
        "layout": {"tp": bc.layout.tp, "sp": bc.layout.sp, "pp": bc.layout.pp,
                   "vp": bc.layout.vp, "dp": bc.dp, "world": world,
                   "micro_batch": bc.micro_batch, "global_batch": bc.batch,
                   "microbatches": bc.batch // (bc.micro_batch * bc.dp),
                   "seq_length": bc.seq_length, "recompute": bc.recompute, "dtype": bc.dtype,
                   "distributed_optimizer": True, "overlap_grad_reduce": True,
                   "compiled_swiglu": bc.compile,
                   "attention": "torch SDPA (local spec)" if not on_gpu else "spec default"},
        "iterations": {"warmup": bc.warmup, "measured": bc.iters},
        "step_time_s": step,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tok_s,
        "tokens_per_s_per_gpu": tok_s_gpu,
        "flops_per_token": flops,
        "formulas": {"palm": PALM_FORMULA, "megatron_causal": MEGATRON_FORMULA},
        "tflops_per_gpu": tflops,
        "peak_tflops_per_gpu": peak,
        "peak_source": source,
        "mfu": {k: (v / peak if peak else None) for k, v in tflops.items()},
        "loss": per_rank[-1]["loss"],
    }
    if gemm_median:
        median = statistics.fmean(gemm_median)
        report["gemm_tflops"] = {"best": statistics.fmean(gemm_best), "median": median,
                                 "windows_rank0": per_rank[0]["gemm"],
                                 # PaLM model FLOP/s over the typical (median) GEMM rate
                                 "palm_fraction_of_median": tflops["palm"] / median}
        shapes = [r["gemm_model_shapes"] for r in per_rank if r.get("gemm_model_shapes")]
        if shapes:
            # the same model's GEMMs alone (gemm_ceiling.py): the rate a step with no
            # overhead at all would reach on this CPU
            ceiling = statistics.fmean(shapes)
            report["gemm_tflops"].update({
                "model_shapes": ceiling, "model_shapes_fraction_of_median": ceiling / median,
                "palm_fraction_of_model_shapes": tflops["palm"] / ceiling})
    if per_rank[0].get("breakdown"):
        report["time_breakdown_rank0"] = _breakdown(bc, per_rank[0]["breakdown"])
    if "static_bytes" in per_rank[0]:
        peak_bytes = [r["static_bytes"] + r["step_peak_bytes"] for r in per_rank]
        report["memory"] = {
            "peak_tensor_gb_per_rank": [b / 1e9 for b in peak_bytes],
            "static_tensor_gb_per_rank": [r["static_bytes"] / 1e9 for r in per_rank],
            "peak_rss_gb_per_rank": [r["peak_rss"] / 1e9 for r in per_rank],
            "method": "peak tensor = weights + grad buffers + optimizer state (distinct "
                      "storages) + peak (alloc - free) of one extra profiled step from torch's "
                      "allocator; peak RSS = VmHWM of the process (includes Python, libraries, "
                      "allocator caches)"}
    hf_times = per_rank[0]["hf_times"]
    if hf_times:
        hf_step = _stats(hf_times)
        hf_tok_s = tokens_per_step / hf_step["mean"]
        report["transformers"] = {
            "version": per_rank[0]["hf_version"], "model": "LlamaForCausalLM (sdpa, fp32)",
            "optimizer": "torch.optim.AdamW (default CPU implementation) + clip_grad_norm_",
            "step_time_s": hf_step, "tokens_per_s": hf_tok_s, "loss": per_rank[0]["hf_loss"],
            "ratio_ours_over_transformers": tok_s / hf_tok_s,
            # median over steps of (transformers step time / our step time next to it):
            # robust to load that changes between steps on a shared machine
            "ratio_paired_median": statistics.median(h / o for h, o in zip(hf_times, times)),
            "mfu_palm": tokens_per_step / hf_step["mean"] * flops["palm"] / 1e12 / peak
            if peak else None}
    return report


def _breakdown(bc: BenchConfig, breakdown: dict) -> dict:
    """Rank 0's profiled step by kind, with the GEMM rate inside the step where it is known."""
    from megatron_llama.bench.gemm_ceiling import step_gemms

    out = dict(breakdown)
    gemm_s = breakdown["self_s"]["GEMMs"]
    if bc.layout.pp == 1 and bc.recompute == "none" and gemm_s > 0:
        microbatches = bc.batch // (bc.micro_batch * bc.dp)
        flops = sum(g.flops for g in step_gemms(bc.model, bc.layout.tp, bc.micro_batch,
                                                 bc.seq_length, microbatches))
        out["gemm_tflops_in_step"] = flops / gemm_s / 1e12
    return out
