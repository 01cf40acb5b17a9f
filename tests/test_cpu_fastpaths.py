"""`megatron_llama.compat.cpu_fastpaths` against megatron-core's own CPU fallbacks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def tp1(megatron_single):
    from megatron_llama.parallel import ParallelLayout, destroy, initialize

    initialize(ParallelLayout(), seed=0)  # also enables the CPU adapter (and the fast paths)
    yield
    destroy()


def _loss_and_grad(fn, logits, target):
    x = logits.clone().requires_grad_()
    y = x * 1.0  # the function overwrites its input, as megatron-core's does
    loss = fn(y, target)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view_as(loss))
    return loss.detach(), x.grad


def test_cross_entropy_matches_megatron(tp1):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy

    fast = tensor_parallel.vocab_parallel_cross_entropy
    assert getattr(fast, "_megatron_llama_cpu", False)
    torch.manual_seed(0)
    logits = torch.randn(7, 3, 101) * 4
    logits[0, 0, 5] = 300.0  # a target probability that underflows to 0 (loss ~300)
    target = torch.randint(0, 101, (7, 3))
    target[0, 0] = 6
    ref_loss, ref_grad = _loss_and_grad(
        lambda y, t: _VocabParallelCrossEntropy.apply(y, t, 0.0), logits, target)
    loss, grad = _loss_and_grad(fast, logits, target)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(loss).all()


def test_multi_tensor_scale_is_exact():
    from megatron.core.utils import local_multi_tensor_scale

    from megatron_llama.compat.cpu_fastpaths import _multi_tensor_scale

    torch.manual_seed(0)
    src = [torch.randn(33), torch.randn(4, 5)]
    expected = [t.clone() for t in src]
    local_multi_tensor_scale(0, None, [expected, expected], 0.37)
    inplace = [t.clone() for t in src]
    _multi_tensor_scale(0, None, [inplace, inplace], 0.37)
    out = [torch.empty_like(t) for t in src]
    _multi_tensor_scale(0, None, [src, out], 0.37)
    for e, a, b in zip(expected, inplace, out):
        assert torch.equal(e, a) and torch.equal(e, b)


def test_single_rank_collectives_are_skipped_only_when_aliased(tp1):
    import torch.distributed as dist

    from megatron_llama.compat.cpu_fastpaths import _identity_on_one_rank

    calls = []
    wrapped = _identity_on_one_rank(lambda out, inp, **kw: calls.append(kw))
    buf = torch.arange(6.0)
    assert wrapped(buf, buf, group=dist.group.WORLD, async_op=True).wait()
    assert wrapped(buf, buf, group=dist.group.WORLD) is None
    assert calls == []
    wrapped(torch.empty(6), buf, group=dist.group.WORLD)  # distinct memory: really called
    assert len(calls) == 1
