"""Every parallel layout computes what a single process computes (2 gloo processes, fp32).

One spawned process group runs all layouts of `megatron_llama.selfcheck` in turn (megatron-
core's import cost is paid once); the single-process reference runs in the test process.
Both start from the same Meta-named random weights, loaded through the package's weight
mapping, and see the same global batch. Compared after megatron-core's gradient
finalisation: the loss and every gradient, mapped back to Meta's names, within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from megatron_llama import selfcheck
from tests.llama_testing import rel_err

pytestmark = pytest.mark.multiprocess  # one spawned process group runs every layout

# Recompute reruns the same ops on the same data: it must not change a single bit.
RECOMPUTE_BASELINE = {"TP2-SP-full-recompute": "TP2-SP", "TP2-selective-recompute": "TP2",
                      "PP2-full-recompute": "PP2-1F1B"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, megatron_single):
    return selfcheck.run_all(workdir=str(tmp_path_factory.mktemp("parallel")), timeout=600)


@pytest.mark.parametrize("case", list(selfcheck.CASES))
def test_layout_matches_single_process(runs, case):
    reference, per_rank = runs
    ref_loss, ref_grads = reference["loss"], reference["grads"]
    loss, grads, _ = selfcheck.merge(case, per_rank)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    errors = {k: rel_err(grads[k], ref_grads[k]) for k in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{case}: gradient of {worst} off by {errors[worst]:.2e}"
    # Every gradient is really there (a zero gradient would hide a missing reduction).
    assert all(ref_grads[k].abs().max() > 0 for k in ref_grads)


@pytest.mark.parametrize("case", list(RECOMPUTE_BASELINE))
def test_recompute_is_bitwise_identical(runs, case):
    _, per_rank = runs
    loss, _, shards = selfcheck.merge(case, per_rank)
    base_loss, _, base_shards = selfcheck.merge(RECOMPUTE_BASELINE[case], per_rank)
    assert torch.equal(loss, base_loss)
    for key, tensors in base_shards.items():
        for name, g in tensors.items():
            assert torch.equal(shards[key][name], g), f"{case}: {key} {name} differs"
