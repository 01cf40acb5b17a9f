"""Context parallelism's batch split and loss, with megatron-core's real CP groups on gloo.

The ring attention itself is Transformer Engine's (CUDA only; `--cp` is refused on CPU in one
line); what runs here is everything around it: megatron-core's CP process groups, its 2 x CP
chunk split of each sequence, and the loss reduction that makes CP ranks report the mean
loss and, after megatron-core's DP x CP gradient averaging, the gradient of that mean.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from megatron_llama.local_ranks import run_processes

SEQ = 16


def cp_worker(rank, world, workdir):
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    from megatron_llama.parallel import ParallelLayout, destroy, init_distributed, initialize
    from megatron_llama.training.engines.megatron_core import (
        context_parallel_lm_loss,
        context_parallel_slice,
    )

    init_distributed()
    initialize(ParallelLayout(cp=2))
    try:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 50, (2, SEQ), generator=g)
        labels = torch.randint(0, 50, (2, SEQ), generator=g)
        mask = (torch.rand(2, SEQ, generator=g) > 0.3).float()
        per_token = torch.rand(2, SEQ, generator=g)  # stands in for the model's loss [b, s]
        positions = torch.arange(SEQ).expand_as(tokens)
        t, lab, pos, m = context_parallel_slice(tokens, labels, positions, mask)
        mine = per_token[:, pos[0]].clone().requires_grad_(True)
        # through megatron-core's own loss step (it scales a two-value loss by CP)
        store: list = []
        loss = forward_step_calc_loss(
            torch.nn.Module(), mine, partial(context_parallel_lm_loss, loss_mask=m),
            SimpleNamespace(calculate_per_token_loss=False, timers=None), None, False, 1,
            store, cp_group_size=2, is_last_stage=True)
        loss = loss[0] if isinstance(loss, tuple) else loss
        report = store[0]
        loss.backward()
        grad = torch.zeros(2, SEQ)
        grad[:, pos[0]] = mine.grad
        return {"positions": pos[0].tolist(), "tokens_match": torch.equal(t, tokens[:, pos[0]])
                and torch.equal(lab, labels[:, pos[0]]), "report": report["lm loss"].item(),
                "grad": grad, "expected": ((per_token * mask).sum() / mask.sum()).item(),
                "mask": mask}
    finally:
        destroy()


@pytest.mark.multiprocess
def test_context_parallel_split_and_loss(tmp_path):
    results = run_processes(cp_worker, 2, str(tmp_path), timeout=300)
    # chunks of SEQ / 4: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    assert results[0]["positions"] == [0, 1, 2, 3, 12, 13, 14, 15]
    assert results[1]["positions"] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert all(r["tokens_match"] for r in results)
    for r in results:  # every CP rank reports the whole microbatch's mean loss
        assert r["report"] == pytest.approx(r["expected"], rel=1e-6)
    # averaged over the DP x CP group (as megatron-core's DDP does), the gradients are those
    # of the mean loss over all tokens: mask / count
    mask = results[0]["mask"]
    averaged = (results[0]["grad"] + results[1]["grad"]) / 2
    torch.testing.assert_close(averaged, mask / mask.sum())


def test_cp_refused_on_a_cpu_host_in_one_line(capsys):
    from megatron_llama import cli

    if torch.cuda.is_available():
        pytest.skip("a GPU host may run CP")
    code = cli.main(["pretrain", "--preset", "tiny", "--synthetic", "--cp", "2",
                     "--nproc-per-node", "2", "--train-steps", "1"])
    assert code == 2
    assert capsys.readouterr().err == (
        "megatron-llama pretrain: error: --cp 2: context parallelism runs megatron-core's "
        "ring attention in Transformer Engine's CUDA attention kernels; this host has no GPU "
        "(use --cp 1 here)\n")
    # the layout itself is legal: `plan` and `sbatch` accept it on this host
    from megatron_llama.model.presets import get_preset
    from megatron_llama.parallel import ParallelLayout

    ParallelLayout(tp=8, cp=16, pp=16, embedding_and_loss_as_layers=True).check(
        get_preset("llama3.1-405b").model, 2048)
