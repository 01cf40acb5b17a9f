"""The printed table of one `megatron-llama benchmark` report and its JSON file."""

from __future__ import annotations

from megatron_llama.bench.benchmark import MEGATRON_FORMULA, PALM_FORMULA


def format_report(r: dict) -> str:
    """A human-readable table of one report."""
    lay, m, st = r["layout"], r["model"], r["step_time_s"]
    vp = f" VP={lay['vp']}" if lay["vp"] else ""
    lines = [
        f"benchmark on {r['device']}",
        f"model    {m['preset']}: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads, "
        f"ffn {m['ffn']}, vocab {m['vocab_size']}, {m['params']:,} parameters",
        f"layout   TP={lay['tp']}{' (SP)' if lay['sp'] else ''} PP={lay['pp']}{vp} "
        f"DP={lay['dp']} ({lay['world']} rank(s)), micro batch {lay['micro_batch']}, global "
        f"batch {lay['global_batch']} ({lay['microbatches']} microbatches) x seq "
        f"{lay['seq_length']}, recompute {lay['recompute']}, {lay['dtype']}, distributed "
        f"AdamW, {lay['attention']}",
        f"steps    {r['iterations']['warmup']} warmup + {r['iterations']['measured']} timed: "
        f"mean {st['mean'] * 1e3:,.0f} ms, median {st['median'] * 1e3:,.0f} ms, "
        f"p90 {st['p90'] * 1e3:,.0f} ms (loss {r['loss']:.3f})",
        f"{'':<24}{'PaLM':>14}{'megatron causal':>18}",
        f"{'tokens/s/GPU':<24}{r['tokens_per_s_per_gpu']:>14,.1f}{'':>18}",
        f"{'TFLOP/s/GPU':<24}{r['tflops_per_gpu']['palm']:>14.4f}"
        f"{r['tflops_per_gpu']['megatron_causal']:>18.4f}",
    ]
    if r["mfu"]["palm"] is not None:
        lines.append(f"{'MFU':<24}{100 * r['mfu']['palm']:>13.1f}%"
                     f"{100 * r['mfu']['megatron_causal']:>17.1f}%")
    lines.append(f"peak     {r['peak_tflops_per_gpu']:.4f} TFLOP/s per GPU ({r['peak_source']})")
    if "gemm_tflops" in r:
        g = r["gemm_tflops"]
        lines.append(f"GEMM     best {g['best'] * 1e3:.1f} GFLOP/s, median {g['median'] * 1e3:.1f} "
                     f"GFLOP/s per rank (CPU, measured in this run); model FLOP/s (PaLM) = "
                     f"{100 * g['palm_fraction_of_median']:.0f}% of the median")
        if "model_shapes" in g:
            lines.append(f"GEMMs    this model's own GEMMs alone (fwd, input and weight grad of "
                         f"every linear layer): {g['model_shapes'] * 1e3:.1f} GFLOP/s = "
                         f"{100 * g['model_shapes_fraction_of_median']:.0f}% of the median above;"
                         f" model FLOP/s (PaLM) = {100 * g['palm_fraction_of_model_shapes']:.0f}%"
                         f" of it")
    if "time_breakdown_rank0" in r:
        b = r["time_breakdown_rank0"]
        parts = [f"{kind} {sec:.3f} s" + (f" ({b['gemm_tflops_in_step'] * 1e3:.0f} GFLOP/s)"
                                          if kind == "GEMMs" and "gemm_tflops_in_step" in b
                                          else "") for kind, sec in b["self_s"].items()]
        lines.append(f"time     one profiled step on rank 0 ({b['wall_s']:.3f} s, CPU self time "
                     f"by kind): {', '.join(parts)}")
        if b.get("top_other_s"):
            lines.append("         most of other: " + ", ".join(
                f"{op} {sec:.3f} s" for op, sec in b["top_other_s"].items()))
    lines.append(f"FLOPs    PaLM: {PALM_FORMULA}; megatron: {MEGATRON_FORMULA}")
    if "memory" in r:
        mem = r["memory"]
        fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        lines.append(f"memory   peak tensor GB per rank [{fmt(mem['peak_tensor_gb_per_rank'])}] "
                     f"(static [{fmt(mem['static_tensor_gb_per_rank'])}]), peak RSS GB "
                     f"[{fmt(mem['peak_rss_gb_per_rank'])}]")
    if "transformers" in r:
        t = r["transformers"]
        lines.append(f"transformers {t['version']} {t['model']}, same shapes, threads, batch, "
                     f"seq, interleaved step by step: {t['tokens_per_s']:,.1f} tokens/s "
                     f"(median step {t['step_time_s']['median'] * 1e3:,.0f} ms, loss "
                     f"{t['loss']:.3f})")
        lines.append(f"ours / transformers = {t['ratio_ours_over_transformers']:.3f} "
                     f"({r['tokens_per_s']:,.1f} vs {t['tokens_per_s']:,.1f} tokens/s); "
                     f"median of step-by-step ratios {t['ratio_paired_median']:.3f}")
    return "\n".join(lines)


def format_sweep(rows: list[dict]) -> str:
    """One line per sweep point (the CSV rows of `benchmark_command`), skipped points with why."""
    lines = [f"{'layout':<22}{'ranks':>6}{'tok/s/rank':>12}{'MFU PaLM':>10}{'MFU mcore':>10}"
             f"{'median s':>10}{'peak tensor GB':>16}"]
    def num(value, spec: str, width: int, scale: float = 1.0, suffix: str = "") -> str:
        # "-" where the run had no such number (no known peak, --no-memory)
        if value in ("", None):
            return f"{'-':>{width}}"
        return f"{format(scale * value, spec) + suffix:>{width}}"

    for r in rows:
        if r["error"]:  # "failed: ..." when it ran and died, else why it was skipped
            why = r["error"] if r["error"].startswith("failed:") else f"skipped: {r['error']}"
            lines.append(f"{r['label']:<22} {why}")
            continue
        lines.append(f"{r['label']:<22}{r['world']:>6}{r['tokens_per_s_per_gpu']:>12,.0f}"
                     f"{num(r['mfu_palm'], '.1f', 10, 100, '%')}"
                     f"{num(r['mfu_megatron_causal'], '.1f', 10, 100, '%')}"
                     f"{r['step_median_s']:>10.3f}{num(r['peak_tensor_gb_max'], '.3f', 16)}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> str:
    """Write ``report`` to ``path`` whole or not at all (temporary file, then rename)."""
    from megatron_llama import fileio

    return fileio.write_json(report, path)
