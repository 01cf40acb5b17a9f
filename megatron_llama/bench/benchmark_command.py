"""Flags of `megatron-llama benchmark`, and `--sweep` over layouts (CSV + PNG chart)."""

from __future__ import annotations

import argparse
import csv
import itertools
import os
from typing import Optional

from megatron_llama.errors import ConfigError, require
from megatron_llama.fileio import atomic_write, write_figure
from megatron_llama.model.presets import get_preset
from megatron_llama.parallel import ParallelLayout

CSV_FIELDS = ("label", "tp", "sp", "pp", "vp", "dp", "world", "micro_batch", "global_batch",
              "recompute", "seq_length", "tokens_per_s_per_gpu", "tflops_per_gpu_palm",
              "mfu_palm", "mfu_megatron_causal", "step_median_s", "step_p90_s",
              "peak_tensor_gb_max", "peak_rss_gb_max", "error")


def bench_config_from_args(args: argparse.Namespace, **changes):
    """A `BenchConfig` from the parsed flags; ``changes`` override layout fields (sweep)."""
    from megatron_llama.bench.benchmark import BenchConfig

    preset = get_preset(args.preset)
    overrides = {k: v for k, v in (("dim", args.dim), ("n_layers", args.layers),
                                   ("n_heads", args.heads), ("n_kv_heads", args.kv_heads),
                                   ("vocab_size", args.vocab_size),
                                   ("multiple_of", args.multiple_of)) if v is not None}
    model = preset.model.replace(**overrides)
    seq = args.seq_length or min(preset.seq_length, model.max_seq_len)
    if seq > model.max_seq_len:
        model = model.replace(max_seq_len=seq)
    values = dict(tp=args.tp, pp=args.pp, vp=args.vp, sp=args.sp, dp=args.dp,
                  micro_batch=args.micro_batch, recompute=args.recompute)
    values.update(changes)
    return BenchConfig(
        model=model, preset=preset.name + (" with overrides" if overrides else ""),
        layout=ParallelLayout(tp=values["tp"], pp=values["pp"], vp=values["vp"], sp=values["sp"]),
        dp=values["dp"], seq_length=seq, micro_batch=values["micro_batch"],
        global_batch=args.global_batch, recompute=values["recompute"], dtype=args.dtype,
        warmup=args.warmup, iters=args.iters, threads=args.threads,
        compare_hf=args.compare_hf and not changes, peak_tflops=args.peak_tflops,
        measure_memory=not args.no_memory, compile=args.compile,
        progress=not args.no_progress)


def _csv_row(label: str, report: Optional[dict], error: str = "") -> dict:
    row = {k: "" for k in CSV_FIELDS}
    row.update(label=label, error=error)
    if report:
        lay = report["layout"]
        row.update({k: lay[k] for k in ("tp", "sp", "pp", "vp", "dp", "world", "micro_batch",
                                         "global_batch", "recompute", "seq_length")})
        row.update(tokens_per_s_per_gpu=round(report["tokens_per_s_per_gpu"], 3),
                   tflops_per_gpu_palm=round(report["tflops_per_gpu"]["palm"], 5),
                   mfu_palm=report["mfu"]["palm"], mfu_megatron_causal=report["mfu"]["megatron_causal"],
                   step_median_s=report["step_time_s"]["median"],
                   step_p90_s=report["step_time_s"]["p90"])
        if "memory" in report:
            row.update(peak_tensor_gb_max=max(report["memory"]["peak_tensor_gb_per_rank"]),
                       peak_rss_gb_max=max(report["memory"]["peak_rss_gb_per_rank"]))
    return row


def run_sweep(args: argparse.Namespace, csv_path: Optional[str] = None) -> list[dict]:
    """Benchmark every combination of the --sweep-* lists; illegal ones are listed, skipped.

    A point that fails (a rank dies, runs out of memory, times out) is recorded with its
    error and the sweep goes on; with ``csv_path`` the CSV is rewritten after every point,
    so an interrupted sweep keeps what it measured."""
    from megatron_llama.bench.benchmark import run_benchmark
    from megatron_llama.bench.report import format_report

    rows = []
    micro_batches = args.sweep_micro_batch or [args.micro_batch]
    for tp, pp, rc, mb in itertools.product(args.sweep_tp, args.sweep_pp, args.sweep_recompute,
                                            micro_batches):
        sp = args.sp and tp > 1
        label = f"TP{tp}{'+SP' if sp else ''} PP{pp} {rc} mb{mb}"
        try:
            bc = bench_config_from_args(args, tp=tp, pp=pp, vp=None, sp=sp, micro_batch=mb,
                                        recompute=rc)
            bc.check()
            if args.max_procs and bc.world > args.max_procs:
                raise ConfigError(f"needs {bc.world} processes > --max-procs {args.max_procs}")
        except ConfigError as e:
            print(f"skip {label}: {e}")
            rows.append(_csv_row(label, None, str(e)))
            continue
        print(f"== {label}", flush=True)
        try:
            report = run_benchmark(bc)
        except Exception as e:  # noqa: BLE001 - one failed point must not lose the sweep
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            print(f"failed {label}: {reason}", flush=True)
            rows.append(_csv_row(label, None, f"failed: {reason}"))
        else:
            print(format_report(report), flush=True)
            rows.append(_csv_row(label, report))
        if csv_path:
            write_csv(rows, csv_path)
    return rows


def write_csv(rows: list[dict], path: str) -> str:
    """The sweep as CSV, written whole or not at all (temporary file, then rename)."""
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    return atomic_write(path, write)


def write_chart(rows: list[dict], path: str, title: str) -> str:
    """Bars of tokens/s/GPU per layout, PaLM MFU written on each bar."""
    matplotlib = require("matplotlib", "the sweep chart")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 2), 4.5))
    bars = ax.bar(range(len(ok)), [r["tokens_per_s_per_gpu"] for r in ok], color="#4c72b0")
    for bar, r in zip(bars, ok):
        if r["mfu_palm"] not in ("", None):
            ax.annotate(f"{100 * r['mfu_palm']:.0f}%", (bar.get_x() + bar.get_width() / 2,
                                                       bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ok)), [r["label"] for r in ok], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s per GPU (rank)")
    ax.set_title(title + " (labels: MFU, PaLM formula)", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path, dpi=110)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from megatron_llama.bench.benchmark import run_benchmark
    from megatron_llama.bench.report import format_report, format_sweep, write_json

    # a bad --output fails now, not after the whole run
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConfigError(f"{args.output}: --output must be a directory, this is a file")
    if args.sweep:
        os.makedirs(args.output, exist_ok=True)
        csv_path = os.path.join(args.output, "sweep.csv")
        rows = run_sweep(args, csv_path)
        write_csv(rows, csv_path)
        print(format_sweep(rows))
        seq = args.seq_length or get_preset(args.preset).seq_length
        title = f"{args.preset} sweep, seq {seq}, CPU ({os.cpu_count()} cores)"
        png = write_chart(rows, os.path.join(args.output, "sweep.png"), title) \
            if any(not r["error"] for r in rows) else None
        print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
        return 1 if any(r["error"].startswith("failed:") for r in rows) else 0
    bc = bench_config_from_args(args)
    report = run_benchmark(bc)
    print(format_report(report))
    print(f"wrote {write_json(report, os.path.join(args.output, 'benchmark.json'))}")
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="training throughput: tokens/s/GPU, TFLOP/s/GPU, MFU, memory",
        description="Warm up, then time training steps of a preset (real model, real "
        "distributed AdamW, synthetic tokens) on a layout; print a table and write JSON "
        "(tokens/s/GPU, TFLOP/s/GPU, MFU by the PaLM and megatron-core formulas, step time "
        "mean/median/p90, peak memory per rank, the layout). Multi-rank layouts run on local "
        "processes (gloo on CPU). On CPU the peak is the fp32 GEMM rate measured in the same "
        "run. --compare-hf also trains the same shapes with transformers' LlamaForCausalLM.")
    m = p.add_argument_group("model (a preset plus overrides)")
    m.add_argument("--preset", default="tiny", help="tiny, 7B, 13B, 33B or 65B (tiny)")
    m.add_argument("--dim", type=int, default=None, help="override the model width")
    m.add_argument("--n-layers", "--layers", dest="layers", type=int, default=None, help="override the number of layers")
    m.add_argument("--n-heads", "--heads", dest="heads", type=int, default=None, help="override the attention heads")
    m.add_argument("--kv-heads", type=int, default=None, help="grouped-query KV heads")
    m.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary")
    m.add_argument("--multiple-of", type=int, default=None,
                   help="round the SwiGLU width up to this (Meta's multiple_of; 256 for the "
                        "paper's models, 32 for tiny)")
    m.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sequence (default: the preset's pretraining length)")
    lay = p.add_argument_group("layout and batch")
    lay.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1)")
    lay.add_argument("--sp", action="store_true", help="sequence parallelism (TP > 1)")
    lay.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (1)")
    lay.add_argument("--vp", type=int, default=None, help="virtual stages per pipeline rank")
    lay.add_argument("--dp", type=int, default=1, help="data-parallel size (1)")
    lay.add_argument("--micro-batch", type=int, default=4, help="sequences per microbatch (4)")
    lay.add_argument("--global-batch", type=int, default=None,
                     help="sequences per step (micro batch x DP, x 2PP with pipelining)")
    lay.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                     help="activation recompute (none)")
    lay.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="parameter/compute precision (fp32; bf16 is ~20x slower on AVX2 CPUs)")
    run = p.add_argument_group("measurement")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    run.add_argument("--iters", type=int, default=5, help="timed steps (5)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch threads in total, split over the ranks (0: all cores)")
    run.add_argument("--peak-tflops", type=float, default=None,
                     help="peak TFLOP/s per device for MFU (default: known GPU, or the CPU "
                          "GEMM rate measured in this run)")
    run.add_argument("--compare-hf", action="store_true",
                     help="also train the same shapes with transformers' LlamaForCausalLM, "
                          "one step each in turn (single process only)")
    run.add_argument("--compile", action="store_true",
                     help="use megatron-core's SwiGLU fusion, compiled by torch.compile "
                          "(inductor; on CPU needs a C++ compiler, compiles during warmup)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar over the steps (rank 0, on stderr)")
    run.add_argument("--no-memory", action="store_true",
                     help="skip the extra profiled step that measures peak tensor memory "
                          "(on CPU the GEMM ceiling and the time breakdown still run)")
    run.add_argument("--output", default="benchmark_out",
                     help="directory for benchmark.json, sweep.csv, sweep.png (benchmark_out)")
    sw = p.add_argument_group("sweep (--sweep: every combination, one benchmark each)")
    sw.add_argument("--sweep", action="store_true", help="sweep layouts instead of one run")
    sw.add_argument("--sweep-tp", type=int, nargs="+", default=[1, 2], help="TP values (1 2)")
    sw.add_argument("--sweep-pp", type=int, nargs="+", default=[1, 2], help="PP values (1 2)")
    sw.add_argument("--sweep-recompute", nargs="+", default=["none", "full"],
                    choices=("none", "selective", "full"), help="recompute values (none full)")
    sw.add_argument("--sweep-micro-batch", type=int, nargs="+", default=None,
                    help="micro batch values (default: --micro-batch)")
    sw.add_argument("--max-procs", type=int, default=os.cpu_count(),
                    help="skip sweep points needing more local processes than this "
                         "(default: the number of cores)")
    p.set_defaults(func=cmd_benchmark)
