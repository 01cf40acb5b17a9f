"""Every parallel layout computes what a single process computes (2 gloo processes, fp32).

One spawned process group runs all layouts in turn (megatron-core's import cost is paid
once); the single-process reference runs in the test process. Both start from the same
Meta-named random weights, loaded through the package's weight mapping, and see the same
global batch. Compared after megatron-core's gradient finalisation: the loss and every
gradient, mapped back to Meta's names, within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from megatron_llama.parallel import ParallelLayout
from tests.llama_testing import TINY, random_batches, random_meta_weights, rel_err
from tests.multiprocess import run_processes

MICRO, N_MICRO, SEQ = 2, 4, 16
CASES = {
    "TP2": (ParallelLayout(tp=2), "none"),
    "TP2-SP": (ParallelLayout(tp=2, sp=True), "none"),
    "PP2-1F1B": (ParallelLayout(pp=2), "none"),
    "PP2-VP2-interleaved": (ParallelLayout(pp=2, vp=2), "none"),
    "DP2": (ParallelLayout(), "none"),
    "TP2-SP-full-recompute": (ParallelLayout(tp=2, sp=True), "full"),
    "TP2-selective-recompute": (ParallelLayout(tp=2), "selective"),
    "PP2-full-recompute": (ParallelLayout(pp=2), "full"),
}
# Recompute reruns the same ops on the same data: it must not change a single bit.
RECOMPUTE_BASELINE = {"TP2-SP-full-recompute": "TP2-SP", "TP2-selective-recompute": "TP2",
                      "PP2-full-recompute": "PP2-1F1B"}


def run_case(layout: ParallelLayout, recompute: str) -> dict:
    """One forward-backward of the global batch under ``layout`` on this rank."""
    from megatron.core import parallel_state as ps

    from megatron_llama.config import to_transformer_config
    from megatron_llama.engines.megatron import forward_backward, wrap_ddp
    from megatron_llama.model import build_model, load_meta_state_dict, local_shards
    from megatron_llama.parallel import destroy, initialize

    weights = random_meta_weights(TINY)
    batches = random_batches(TINY, N_MICRO, MICRO, SEQ)
    initialize(layout, seed=0)
    try:
        tconfig = to_transformer_config(TINY, layout, recompute=recompute)
        chunks = build_model(TINY, tconfig)
        load_meta_state_dict(chunks, weights, TINY)
        chunks = wrap_ddp(chunks, tconfig)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = len(batches) // dp
        mine = batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        losses = forward_backward(chunks, tconfig, mine, seq_length=SEQ, micro_batch_size=MICRO)
        return {"dp_rank": dp_rank, "loss": torch.stack(losses).mean() if losses else None,
                "grads": local_shards(chunks, grads=True)}
    finally:
        destroy()


def parallel_worker(rank: int, world: int, workdir: str) -> dict:
    from megatron_llama.parallel import init_distributed

    init_distributed()
    return {name: run_case(layout, recompute) for name, (layout, recompute) in CASES.items()}


def merge(case: str, per_rank: list[dict]):
    """Global loss and Meta-named full gradients of one case from all ranks' results."""
    from megatron_llama.convert.canonical import megatron_to_meta

    layout = CASES[case][0]
    results = [r[case] for r in per_rank]
    losses = [r["loss"] for r in results if r["loss"] is not None]
    loss = torch.stack(losses).mean()  # DP ranks each hold the mean of their half
    shards = {}
    for r in results:
        if r["dp_rank"] == 0:
            shards.update(r["grads"])
    grads = megatron_to_meta(shards, TINY, tp=layout.tp, pp=layout.pp, vp=layout.vp)
    return loss, grads, shards


@pytest.fixture(scope="module")
def runs(tmp_path_factory, megatron_single):
    reference = run_case(ParallelLayout(), "none")
    from megatron_llama.convert.canonical import megatron_to_meta

    ref_grads = megatron_to_meta(reference["grads"], TINY)
    per_rank = run_processes(parallel_worker, 2, str(tmp_path_factory.mktemp("parallel")),
                             timeout=600)
    return reference["loss"], ref_grads, per_rank


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(runs, case):
    ref_loss, ref_grads, per_rank = runs
    loss, grads, _ = merge(case, per_rank)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    errors = {k: rel_err(grads[k], ref_grads[k]) for k in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{case}: gradient of {worst} off by {errors[worst]:.2e}"
    # Every gradient is really there (a zero gradient would hide a missing reduction).
    assert all(ref_grads[k].abs().max() > 0 for k in ref_grads)


@pytest.mark.parametrize("case", list(RECOMPUTE_BASELINE))
def test_recompute_is_bitwise_identical(runs, case):
    _, _, per_rank = runs
    loss, _, shards = merge(case, per_rank)
    base_loss, _, base_shards = merge(RECOMPUTE_BASELINE[case], per_rank)
    assert torch.equal(loss, base_loss)
    for key, tensors in base_shards.items():
        for name, g in tensors.items():
            assert torch.equal(shards[key][name], g), f"{case}: {key} {name} differs"
