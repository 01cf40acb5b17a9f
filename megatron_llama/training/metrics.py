"""Throughput accounting (tokens/s/GPU, TFLOP/s/GPU, MFU) and the run log (stdout, JSONL, wandb).

MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs per token
``6 N + 12 L H Q T`` (N = parameters without the input embedding, L layers, H heads, Q head
dim, T sequence length), times tokens/s/GPU, over the accelerator's dense peak. megatron-core
counts causal attention as half (``6 N + 6 L H Q T``); both are reported where asked.
On CPU the peak is the fp32 GEMM throughput measured at start-up on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from typing import Optional

from megatron_llama.errors import require
from megatron_llama.fileio import write_text
from megatron_llama.model.config import LlamaConfig

# Dense bf16 peak TFLOP/s per GPU (no sparsity).
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0, "h800": 989.0, "a800": 312.0,
                   "l40s": 362.0, "b200": 2250.0}


def flops_per_token(cfg: LlamaConfig, seq_length: int, causal_half: bool = False) -> float:
    """Training FLOPs per token (forward + backward), PaLM's formula."""
    n = cfg.num_params(include_embedding=False)
    attention = (6 if causal_half else 12) * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_length
    return 6.0 * n + attention


def gpu_peak_tflops(name: str) -> Optional[float]:
    """Peak of a known GPU by (part of) its name, e.g. 'NVIDIA A100-SXM4-80GB' -> 312."""
    lowered = name.lower()
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in lowered:
            return value
    return None


def measure_cpu_gemm_tflops(size: int = 1024, windows: int = 5, seconds: float = 0.1) -> float:
    """fp32 matmul throughput of this CPU with the current torch thread count (TFLOP/s).

    Best of several short windows after a warm-up, so a moment of contention does not
    lower the peak (which would inflate MFU). Call it on all ranks at once.
    """
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            count += 1
        best = max(best, 2.0 * size**3 * count / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(override: Optional[float] = None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from)."""
    import torch

    if override:
        return override, "flag"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        value = gpu_peak_tflops(name)
        if value is not None:
            return value, f"{name} bf16 dense"
        return 0.0, f"unknown GPU {name}: pass --peak-tflops"
    return measure_cpu_gemm_tflops(), "CPU fp32 GEMM measured"


def memory_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU (GB)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def truncate_log(path: str, last_step: int) -> int:
    """Keep the records of ``path`` up to step ``last_step`` (and no unreadable line, such as
    one cut short by a crash); rewrite it atomically. Returns the number of lines dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record.get("step", 0)) <= last_step
            except (ValueError, TypeError, AttributeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        write_text(path, "".join(kept))
    return dropped


class RunLog:
    """One record per logging interval to stdout, a JSONL file and (optionally) wandb.

    Only the process that constructs it with ``active=True`` (rank 0) writes. A resumed run
    continues the same JSONL file from ``start_step``: records of later steps (written after
    the checkpoint it resumes from, before a crash) are dropped first, so the log holds every
    step exactly once.
    """

    def __init__(self, path: Optional[str], active: bool, wandb_project: Optional[str] = None,
                 wandb_run: Optional[str] = None, wandb_dir: Optional[str] = None,
                 config: Optional[dict] = None, start_step: int = 0):
        self.active = active
        self.file = None
        self.wandb = None
        self.dropped = 0
        if not active:
            return
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.dropped = truncate_log(path, start_step)
            self.file = open(path, "a", encoding="utf-8")
        if wandb_project:
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY")
                                  else "offline")
            wandb = require("wandb", "--wandb-project")

            self.wandb = wandb.init(project=wandb_project, name=wandb_run, dir=wandb_dir,
                                    config=config or {}, resume="allow")

    def write(self, record: dict, echo: Optional[str] = None) -> None:
        if not self.active:
            return
        if echo:
            print(echo, flush=True)
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk must not end the run over its log
                print(f"warning: {self.file.name}: cannot write the log ({e.strerror}); "
                      "logging to stdout only from here", flush=True)
                with contextlib.suppress(OSError):
                    self.file.close()
                self.file = None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=record.get("step"))

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
