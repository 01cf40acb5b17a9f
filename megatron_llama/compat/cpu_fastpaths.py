"""CPU fast paths for megatron-core's training step (installed by `compat.install()` on CPU hosts).

On a CPU-only host megatron-core 0.16.1 runs its fallbacks for what apex / TE / NCCL would
do on a GPU. A profile of one fp32 step (dim 512, 8 layers, vocab 32000, 2048 tokens, one
rank) showed three of them costing real time beyond the GEMMs. Each is replaced here, for
CPU tensors only; 1 and 2 do the same floating-point operations on the same values (bitwise
unchanged), 3 agrees to rounding:

1. Collectives over a group of one rank. The DDP buffers reduce-scatter every gradient
   bucket and the distributed optimizer all-gathers every parameter bucket, even with DP=1:
   gloo then copies the whole bucket onto itself (~0.2 s a step at 60M parameters). With one
   rank and output aliasing input, ``reduce_scatter_tensor`` / ``all_gather_into_tensor``
   (and their ``_base`` forms) are the identity, so they are skipped
   (`skip_single_rank_collectives`).
2. ``local_multi_tensor_scale`` (apex's ``multi_tensor_scale`` stand-in, used by gradient
   clipping on every gradient) computes ``dst.copy_(src * scale)``: a temporary plus a copy
   per tensor. Here ``torch.mul(src, scale, out=dst)`` (in place when ``src is dst``): the
   same multiplication, written once (`fast_multi_tensor_scale`).
3. Vocab-parallel cross entropy with one tensor-parallel rank (`cpu_cross_entropy`).
   megatron-core's takes seven passes over the [s, b, vocab] logits (``max`` with indices,
   subtract, ``exp``, sum, divide; multiply in the backward) plus three all-reduces over
   the TP group of one; ~0.16 s of a 3.3 s step at vocab 32000. Here the softmax is torch's
   fused kernel, in place (one read pass and one write pass), the loss is ``-log p[target]``
   and the backward the same in-place ``p - onehot`` times the incoming gradient as
   megatron-core's: ~0.08 s. Not bitwise equal to megatron-core's chain (the fused softmax
   rounds differently: < 1e-5 relative), and with TP > 1, label smoothing, targets outside
   the vocabulary or CUDA tensors megatron-core's own function runs.

`install_cpu_fastpaths` applies them once; `compat.install()` calls it on CPU-only hosts only.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

_INSTALLED = False


class _DoneWork:
    """Stand-in for a finished async collective (what ``async_op=True`` returns)."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype
            and a.device == b.device and a.is_contiguous() and b.is_contiguous())


def _identity_on_one_rank(collective):
    """Wrap a (output, input) bucket collective: skip it when it can only be the identity."""
    if getattr(collective, "_megatron_llama_single_rank", False):
        return collective

    @functools.wraps(collective)
    def wrapper(output, input, *args, **kwargs):
        group = kwargs.get("group")
        # positional extras (op, group, ...) are not what megatron-core passes: leave them be
        if (not args and not output.is_cuda and dist.is_initialized()
                and dist.get_world_size(group) == 1 and _same_memory(output, input)):
            # one rank: the sum / average / gather of one shard is that shard, in place
            return _DoneWork() if kwargs.get("async_op") else None
        return collective(output, input, *args, **kwargs)

    wrapper._megatron_llama_single_rank = True
    return wrapper


def skip_single_rank_collectives() -> None:
    """Make megatron-core's bucket reduce-scatter / all-gather free when DP has one rank."""
    from megatron.core.distributed import param_and_grad_buffer as pgb

    pgb.dist_reduce_scatter_func = _identity_on_one_rank(pgb.dist_reduce_scatter_func)
    pgb.dist_all_gather_func = _identity_on_one_rank(pgb.dist_all_gather_func)


def _multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``megatron.core.utils.local_multi_tensor_scale``, without temporaries."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src.is_cuda or dst.is_cuda or src.shape != dst.shape or src.dtype != dst.dtype:
            dst.copy_(src * scale)  # megatron-core's own expression (dtype casts, broadcast)
        elif src is dst or _same_memory(src, dst):
            dst.mul_(scale)
        else:
            torch.mul(src, scale, out=dst)


def fast_multi_tensor_scale() -> None:
    """Point megatron-core's optimizer and clipping at `_multi_tensor_scale` when they use
    the local (non-apex) fallback."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _multi_tensor_scale


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Cross entropy of fp32 logits [s, b, V] with targets [s, b] (one TP rank, no smoothing).

    Like megatron-core's, it overwrites the logits with the softmax (no second [s, b, V]
    tensor; nothing else reads the logits) and keeps it for the backward.
    """

    @staticmethod
    def forward(ctx, logits, target):
        vocab = logits.size(-1)
        logits_2d = logits.view(-1, vocab)
        target_1d = target.reshape(-1, 1)
        # kept for rows whose target probability underflows (a confidently wrong model)
        row_max = logits_2d.amax(dim=-1)
        target_logit = logits_2d.gather(1, target_1d).squeeze(1)
        torch._softmax(logits_2d, -1, False, out=logits_2d)
        target_prob = logits_2d.gather(1, target_1d).squeeze(1)
        loss = -torch.log(target_prob)
        tiny = target_prob < 1e-30
        if bool(tiny.any()):
            # log-sum-exp = max + log(sum exp(x - max)), and the max's probability is 1 / sum
            rows = tiny.nonzero().squeeze(1)
            loss[rows] = (row_max[rows] - target_logit[rows]
                          - torch.log(logits_2d[rows].amax(dim=-1)))
        ctx.save_for_backward(logits, target_1d)
        return loss.view_as(target)

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_1d = ctx.saved_tensors
        grad_2d = softmax.view(-1, softmax.size(-1))
        rows = torch.arange(grad_2d.size(0), device=grad_2d.device)
        grad_2d[rows, target_1d.squeeze(1)] -= 1.0  # d loss / d logits = p - onehot
        grad_2d.mul_(grad_output.reshape(-1, 1))
        return softmax, None


def _fast_cross_entropy_applies(logits, target, label_smoothing) -> bool:
    from megatron.core import parallel_state as ps

    if logits.is_cuda or label_smoothing > 0 or target.numel() == 0:
        return False
    if ps.get_tensor_model_parallel_world_size() != 1:
        return False
    return bool(target.min() >= 0) and bool(target.max() < logits.size(-1))


def cpu_cross_entropy(original):
    """``vocab_parallel_cross_entropy`` taking `_SoftmaxCrossEntropy` where it applies."""
    if getattr(original, "_megatron_llama_cpu", False):
        return original

    @functools.wraps(original)
    def vocab_parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
        if _fast_cross_entropy_applies(vocab_parallel_logits, target, label_smoothing):
            return _SoftmaxCrossEntropy.apply(vocab_parallel_logits.float(), target)
        return original(vocab_parallel_logits, target, label_smoothing)

    vocab_parallel_cross_entropy._megatron_llama_cpu = True
    return vocab_parallel_cross_entropy


def install_cpu_cross_entropy() -> None:
    """Route ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (what GPTModel's
    unfused loss calls) through `cpu_cross_entropy`."""
    from megatron.core import tensor_parallel

    tensor_parallel.vocab_parallel_cross_entropy = cpu_cross_entropy(
        tensor_parallel.vocab_parallel_cross_entropy)


def install_cpu_fastpaths() -> None:
    """Install the CPU fast paths above (idempotent). Call only on CPU-only hosts."""
    global _INSTALLED
    if _INSTALLED:
        return
    skip_single_rank_collectives()
    fast_multi_tensor_scale()
    install_cpu_cross_entropy()
    _INSTALLED = True
