"""`megatron-llama selfcheck`: prove that parallel layouts compute what one process computes.

A small LLaMA with random (seeded) Meta-named weights runs one forward-backward over the
same global batch in one process and under TP, TP+SP, PP (1F1B), PP with interleaved
virtual stages, DP, and with activation recompute, in spawned local processes (gloo on CPU,
NCCL on GPUs). The loss and every gradient (after megatron-core's gradient finalisation,
mapped back to Meta's names) are compared. The test suite asserts exactly this.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Optional

from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout

# Grouped-query attention (2 query heads per group) exercises the per-group QKV layout.
CHECK_CONFIG = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128,
                           multiple_of=16, max_seq_len=32)
MICRO, N_MICRO, SEQ = 2, 4, 16
# name -> (layout, recompute, DDP options)
CASES: dict[str, tuple] = {
    "TP2": (ParallelLayout(tp=2), "none"),
    "TP2-SP": (ParallelLayout(tp=2, sp=True), "none"),
    "PP2-1F1B": (ParallelLayout(pp=2), "none"),
    "PP2-VP2-interleaved": (ParallelLayout(pp=2, vp=2), "none"),
    # uneven stages, as Llama 3.1 405B needs (126 layers on PP=16): 1 + 3 layers here
    "PP2-uneven-1+3": (ParallelLayout(pp=2, first_stage_layers=1), "none"),
    # embedding and loss counted as layers (Llama 3.1 405B on PP16): 4 + 2 = 6 = PP2 x VP3
    "PP2-VP3-ends-as-layers": (ParallelLayout(pp=2, vp=3, embedding_and_loss_as_layers=True),
                               "none"),
    "DP2": (ParallelLayout(), "none"),
    "TP2-SP-full-recompute": (ParallelLayout(tp=2, sp=True), "full"),
    "TP2-selective-recompute": (ParallelLayout(tp=2), "selective"),
    "PP2-full-recompute": (ParallelLayout(pp=2), "full"),
    # Gradient all-reduce overlapped with the backward pass, as `pretrain` runs it. (With the
    # distributed optimizer each rank keeps only its shard of the reduced gradient; that
    # path is checked through training losses in tests/test_training.py.)
    "DP2-overlap-grad-reduce": (ParallelLayout(), "none", {"overlap_grad_reduce": True}),
}

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


def run_case(layout: ParallelLayout, recompute: str = "none", ddp: Optional[dict] = None,
             cfg: LlamaConfig = CHECK_CONFIG) -> dict:
    """One forward-backward of the global batch under ``layout`` on this rank.

    Returns this rank's DP rank, mean loss (None off the last pipeline stage) and its
    finalised gradient shards keyed by (pp_rank, vp_stage, tp_rank).
    """
    import torch
    from megatron.core import parallel_state as ps

    from megatron_llama.model.build import (
        build_model,
        load_meta_state_dict,
        local_shards,
    )
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.model.synthetic import (
        random_meta_state_dict,
        random_token_batches,
    )
    from megatron_llama.parallel import destroy, initialize
    from megatron_llama.training.engines.megatron_core import forward_backward, wrap_ddp

    weights = random_meta_state_dict(cfg)
    batches = random_token_batches(cfg.vocab_size, N_MICRO, MICRO, SEQ)
    initialize(layout, seed=0)
    try:
        tconfig = to_transformer_config(cfg, layout, recompute=recompute)
        chunks = build_model(cfg, tconfig)
        load_meta_state_dict(chunks, weights, cfg)
        chunks = wrap_ddp(chunks, tconfig, **(ddp or {}))
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = len(batches) // dp
        mine = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        losses = forward_backward(chunks, tconfig, mine, seq_length=SEQ, micro_batch_size=MICRO)
        return {"dp_rank": dp_rank, "loss": torch.stack(losses).mean() if losses else None,
                "grads": local_shards(chunks, grads=True)}
    finally:
        destroy()


def worker(rank: int, world: int, workdir: str, case_names: list[str]) -> dict:
    """Entry point of each spawned rank: every requested case in turn, one import."""
    from megatron_llama.parallel import init_distributed

    init_distributed()
    return {name: run_case(*CASES[name]) for name in case_names}


def merge(case: str, per_rank: list[dict], cfg: LlamaConfig = CHECK_CONFIG):
    """Global loss, Meta-named full gradients and raw shards of one case from all ranks."""
    import torch

    from megatron_llama.model.canonical import megatron_to_meta

    layout = CASES[case][0]
    results = [r[case] for r in per_rank]
    loss = torch.stack([r["loss"] for r in results if r["loss"] is not None]).mean()
    shards = {}
    for r in results:
        if r["dp_rank"] == 0:
            shards.update(r["grads"])
    grads = megatron_to_meta(shards, cfg, tp=layout.tp, pp=layout.pp, vp=layout.vp,
                             counts=layout.chunk_counts(cfg.n_layers))
    return loss, grads, shards


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""

    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def run_all(case_names: Optional[list[str]] = None, workdir: Optional[str] = None,
            timeout: float = 600.0) -> tuple[dict, list[dict]]:
    """Single-process reference (in this process) and all cases on 2 spawned ranks."""
    from megatron_llama.local_ranks import run_processes
    from megatron_llama.model.canonical import megatron_to_meta
    from megatron_llama.parallel import init_distributed

    names = list(case_names or CASES)
    init_distributed()
    reference = run_case(ParallelLayout())
    reference["grads"] = megatron_to_meta(reference["grads"], CHECK_CONFIG)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        per_rank = run_processes(worker, 2, tmp, names, timeout=timeout)
    return reference, per_rank


def selfcheck(tolerance: float = 1e-5) -> int:
    """Print loss and worst gradient error per layout; return the number of failures."""
    reference, per_rank = run_all()
    ref_loss = reference["loss"].item()
    print(f"single process: loss {ref_loss:.6f} "
          f"({len(reference['grads'])} gradient tensors, fp32, {N_MICRO} microbatches)")
    print(f"{'layout':<26}{'loss':>10}{'loss err':>10}{'grad err':>10}  result  worst gradient")
    failures = 0
    for name in CASES:
        loss, grads, _ = merge(name, per_rank)
        loss_err = abs(loss.item() - ref_loss) / abs(ref_loss)
        errs = {k: relative_error(grads[k], reference["grads"][k]) for k in reference["grads"]}
        worst = max(errs, key=errs.get)
        ok = loss_err <= tolerance and errs[worst] <= tolerance
        failures += not ok
        print(f"{name:<26}{loss.item():>10.6f}{loss_err:>10.1e}{errs[worst]:>10.1e}  "
              f"{'ok' if ok else 'DIFFERS':<6}  {worst}")
    print("all layouts match the single-process run" if not failures
          else f"{failures} layout(s) differ beyond {tolerance:g}")
    return failures


def cmd_selfcheck(args) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the spawned ranks too
    return 1 if selfcheck(tolerance=args.tolerance) else 0


def add_command(subparsers) -> None:
    """Register `selfcheck`."""
    check = subparsers.add_parser(
        "selfcheck", help="prove TP/SP/PP/VP/DP and recompute match a single process",
        description="Run one forward-backward of a small LLaMA (random seeded weights) in this "
        "process and under TP=2, TP=2+SP, PP=2 (1F1B), PP=2 with interleaved virtual stages, "
        "DP=2 and activation recompute on 2 spawned local processes (gloo on CPU), then "
        "compare the loss and every gradient. Exit code 1 if any layout differs.")
    check.add_argument("--tolerance", type=float, default=1e-5,
                       help="largest accepted relative error of loss and gradients (fp32)")
    check.set_defaults(func=cmd_selfcheck)
