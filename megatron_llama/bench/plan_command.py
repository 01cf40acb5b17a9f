"""Flags and printing of `megatron-llama plan` (the math is in `planner`)."""

from __future__ import annotations

import argparse

from megatron_llama.bench.planner import (
    GB,
    GPUS,
    budget,
    evaluate,
    plan,
    resolve,
)
from megatron_llama.errors import ConfigError
from megatron_llama.fileio import write_json


def _tokens(n: float) -> str:
    """1.4e12 -> '1.40T', 2.0e7 -> '20.0M', 4096 -> '4,096'."""
    if n >= 1e11:
        return f"{n / 1e12:.2f}T"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n:,.0f}"


def _row(c, unit: float) -> str:
    mem, tm = c.memory, c.time
    comm = sum(tm.comm_bytes.values())
    step = f"{tm.total:>8.2f}" if tm.total >= 0.01 else f"{tm.total:>8.1e}"
    return (f"{c.layout.describe():<70}{mem.weights / unit:>7.1f}{mem.gradients / unit:>7.1f}"
            f"{mem.optimizer / unit:>7.1f}{mem.activations / unit:>7.1f}"
            f"{mem.transient / unit:>7.1f}{mem.total / unit:>8.1f}{'' if c.fits else '!':<2}"
            f"{comm / unit:>8.1f}{step}{c.tokens_per_s_per_gpu:>9.0f}{100 * c.mfu:>6.1f}%"
            f"{c.tflops_per_gpu:>7.0f}")


def _hours(h: float) -> str:
    """GPU-hours: whole hours for real runs, three significant digits for tiny ones."""
    return f"{h:>14,.0f}" if h >= 100 else f"{h:>14.3g}"


def format_plan(args, preset, gpu, cands, chosen, rates) -> str:
    m = preset.model
    shown = cands[:args.top]
    # memory and traffic in GB for real models, MB when every shown layout is under 1 GB
    unit, uname = (GB, "GB") if max(c.memory.total for c in shown) >= GB else (1e6, "MB")
    lines = [f"plan: {preset.name} ({m.num_params():,} parameters) on {args.gpus} x {gpu.name} "
             f"({gpu.peak_tflops:.0f} TFLOP/s bf16, {gpu.memory_gb:.0f} GB), seq "
             f"{args.seq_length}, global batch {args.global_batch} sequences "
             f"({_tokens(args.global_batch * args.seq_length)} tokens), bf16 weights, "
             f"efficiency {args.efficiency:.2f} of peak",
             f"{len(cands)} legal layouts, {sum(c.fits for c in cands)} fit in memory "
             f"(limit {gpu.memory_gb - args.reserve_gb:.0f} GB); best {args.top} by predicted "
             "tokens/s/GPU ('!' = does not fit):",
             f"{'layout':<70}{'wts':>7}{'grads':>7}{'optim':>7}{'acts':>7}{'trans':>7}"
             f"{uname:>8}{'':<2}{'comm ' + uname:>8}{'step s':>8}{'tok/s':>9}{'MFU':>7}"
             f"{'TF/GPU':>7}"]
    lines += [_row(c, unit) for c in shown]
    t = chosen.time
    lines.append(f"chosen {chosen.layout.describe()}: compute {t.compute:.3g} s, bubble "
                 f"{t.bubble:.2g} s, TP comm {t.tp_comm:.2g} s, exposed DP comm "
                 f"{t.dp_comm:.2g} s, PP comm {t.pp_comm:.2g} s per step; per GPU per step "
                 f"TP {t.comm_bytes['tp'] / unit:.1f} {uname}, DP {t.comm_bytes['dp'] / unit:.1f} "
                 f"{uname}, PP {t.comm_bytes['pp'] / unit:.2f} {uname}")
    lines.append(f"budget: {_tokens(preset.train_tokens)} tokens (the preset's), "
                 f"{gpu.power_w:.0f} W per GPU, PUE 1.1, 0.385 tCO2eq/MWh (paper, Table 15)")
    lines.append(f"{'tokens/s/GPU':<28}{'days':>8}{'GPU-hours':>14}{'MWh':>9}{'tCO2eq':>9}")
    for label, b in rates:
        small = b["gpu_hours"] < 100
        lines.append(f"{label:<28}{b['days']:>8.1f}{_hours(b['gpu_hours'])}"
                     f"{b['mwh']:>9.{'3g' if small else '0f'}}{b['tco2eq']:>9.{'3g' if small else '0f'}}")
    if preset.paper_gpu_hours:
        lines.append(f"paper (Table 15): {preset.paper_gpu_hours:,} GPU-hours")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    preset, gpu = resolve(args.preset, args.gpu)
    if args.gpus < 1:
        raise ConfigError("--gpus must be positive")
    if args.top < 1:
        raise ConfigError("--top must be at least 1")
    if args.efficiency is None:
        args.efficiency = gpu.efficiency
    if not 0 < args.efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], not {args.efficiency}")
    args.seq_length = args.seq_length or preset.seq_length
    args.global_batch = args.global_batch or max(1, preset.batch_tokens // args.seq_length)
    if args.layout:
        from megatron_llama.bench.planner import PlanLayout

        lay = PlanLayout(**args.layout)
        if lay.gpus != args.gpus:
            raise ConfigError(f"layout uses {lay.gpus} GPUs, --gpus is {args.gpus}")
        lay.parallel().check(preset.model, args.gpus, lay.micro_batch, args.global_batch)
        cands = [evaluate(preset.model, lay, args.seq_length, args.global_batch, gpu,
                          args.efficiency, args.reserve_gb)]
    else:
        cands = plan(preset.model, args.gpus, gpu, args.seq_length, args.global_batch,
                     args.efficiency, args.reserve_gb)
    chosen = cands[0]
    rates = [(f"{chosen.tokens_per_s_per_gpu:,.0f} (predicted, chosen)",
              budget(preset.train_tokens, chosen.tokens_per_s_per_gpu, args.gpus, gpu.power_w))]
    if args.tokens_per_gpu_s:
        rates.append((f"{args.tokens_per_gpu_s:,.0f} (given)",
                      budget(preset.train_tokens, args.tokens_per_gpu_s, args.gpus, gpu.power_w)))
    print(format_plan(args, preset, gpu, cands, chosen, rates))
    if args.json:
        out = {"preset": preset.name, "gpus": args.gpus, "gpu": gpu.name,
               "candidates": [{"layout": vars(c.layout), "memory_gb": {
                   k: getattr(c.memory, k) / GB for k in
                   ("weights", "gradients", "optimizer", "activations", "transient", "total")},
                   "step_s": c.time.total, "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu,
                   "mfu": c.mfu, "fits": c.fits} for c in cands[:args.top]],
               "budgets": [dict(label=label, **b) for label, b in rates]}
        print(f"wrote {write_json(out, args.json)}")
    return 0


def _layout(text: str) -> dict:
    """'tp=8,pp=4,vp=2,sp,mb=1,rc=selective,dp=64' -> PlanLayout fields."""
    names = {"tp": "tp", "pp": "pp", "dp": "dp", "vp": "vp", "mb": "micro_batch",
             "rc": "recompute", "sp": "sp", "distopt": "distributed_optimizer", "cp": "cp",
             "first": "first_stage_layers", "last": "last_stage_layers",
             "ends": "ends_as_layers"}
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in names:
            raise argparse.ArgumentTypeError(f"unknown layout key {key!r} in {text!r}")
        field = names[key]
        if field in ("sp", "distributed_optimizer", "ends_as_layers"):
            out[field] = value.lower() not in ("0", "false", "no") if value else True
        elif field == "recompute":
            out[field] = value
        else:
            out[field] = int(value)
    return out


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="memory, time and energy of a GPU cluster layout (pure math)",
        description="Enumerate the legal layouts (TP within a node, PP, VP, SP, DP, micro "
        "batch, recompute, distributed optimizer) of a preset on N GPUs, predict memory per "
        "GPU (weights, fp32 grads, Adam states, activations after Korthikanti et al. 2022, "
        "transient logits), communication and step time, rank them by predicted tokens/s/GPU and print "
        "days, GPU-hours, MWh and tCO2eq for the preset's token budget (paper, Table 15).")
    p.add_argument("--preset", default="65B",
                   help="any preset of `megatron-llama info`: 7B .. 65B, llama2-70b, "
                        "llama3-70b, llama3.1-405b, ... (65B)")
    p.add_argument("--gpus", type=int, default=2048, help="number of GPUs (2048)")
    p.add_argument("--gpu", default="a100-80gb",
                   help=f"GPU type: {', '.join(GPUS)} (a100-80gb, as the paper)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per sequence (default: the preset's pretraining length: 2048 "
                        "for LLaMA-1, 4096 Llama 2, 8192 Llama 3 / 3.1)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: the preset's batch tokens / seq-length)")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of the dense peak matmuls and attention reach (default: "
                        "the GPU's calibration; A100 0.59: the LLaMA paper's 65B run on 2048 "
                        "A100s predicts its measured 380 tokens/s/GPU; H100 0.76: fitted to "
                        "the Llama 3 paper's 405B TFLOPs/GPU at 8k and 128k context)")
    p.add_argument("--reserve-gb", type=float, default=4.0,
                   help="GPU memory kept free for the CUDA context and fragmentation (4)")
    p.add_argument("--tokens-per-gpu-s", type=float, default=None,
                   help="also print the budget at this measured rate (the paper: 380 for 65B)")
    p.add_argument("--layout", type=_layout, default=None,
                   help="evaluate one layout instead of searching, e.g. "
                        "'tp=8,sp,pp=4,vp=2,dp=64,mb=1,rc=selective' (also cp=N, ends: the "
                        "embedding and loss as layers, first=N / last=N: end-stage layers)")
    p.add_argument("--top", type=int, default=10, help="layouts to print (10)")
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)
