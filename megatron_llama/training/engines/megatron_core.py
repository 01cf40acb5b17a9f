"""The megatron-core engine: DDP, the distributed AdamW, the schedules, dist-checkpoints.

Gradient reduction, pipeline schedules (1F1B, interleaved), gradient finalisation (DP
all-reduce, SP norm-gradient all-reduce over TP), the optimizer and its lr scheduler are
megatron-core's; this module wires them to LLaMA's causal-LM loss and the paper's recipe.
Checkpoints are `dist_checkpoint`'s (megatron-core dist_checkpointing, reshardable).
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Optional

import torch

from megatron_llama.errors import ConfigError
from megatron_llama.training.engines.base import Engine, lm_loss, on_model_device
from megatron_llama.training.recipe import TrainConfig


def wrap_ddp(chunks: list, tconfig, *, use_distributed_optimizer: bool = False,
             overlap_grad_reduce: bool = False, bucket_size: Optional[int] = None) -> list:
    """Wrap each model chunk in megatron-core's DistributedDataParallel (fp32 grad buffers).

    Also installs ``finalize_model_grads`` on the config, so the schedules all-reduce data-
    parallel gradients and sequence-parallel norm gradients after the last microbatch.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                # bucket only the first chunk, as megatron-core's trainer does
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    tconfig.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        tconfig.no_sync_func = [m.no_sync for m in wrapped]
        if len(wrapped) == 1:
            tconfig.no_sync_func = tconfig.no_sync_func[0]
        tconfig.grad_sync_func = [m.start_grad_sync for m in wrapped]
        if len(wrapped) == 1:
            tconfig.grad_sync_func = tconfig.grad_sync_func[0]
    return wrapped


def _forward_step(data_iterator, model, poison: bool = False):
    """One microbatch: tokens [b, s], labels [b, s] -> per-token loss [b, s] and its reducer."""
    from megatron.core import parallel_state

    batch = on_model_device(next(data_iterator), model)
    tokens, labels = batch["tokens"], batch["labels"]
    if "attention_mask" in batch:  # a fine-tuning row (`data.sft`): examples packed in it
        loss_mask = batch["loss_mask"]
        if _te_attention(model):  # GPU: THD, no [s, s] mask (TE's varlen flash attention)
            tokens, labels, loss_mask, positions, packed = thd_batch(batch)
            output = model(tokens, positions, None, labels=labels, packed_seq_params=packed)
        else:
            output = model(tokens, batch["position_ids"], batch["attention_mask"], labels=labels)
        if getattr(model, "config", None) is not None and model.config.calculate_per_token_loss:
            return output, partial(per_token_lm_loss, loss_mask=loss_mask, poison=poison)
        return output, partial(lm_loss, loss_mask=loss_mask, poison=poison)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    if parallel_state.get_context_parallel_world_size() > 1:
        tokens, labels, position_ids, mask = context_parallel_slice(
            tokens, labels, position_ids, batch.get("loss_mask"))
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(context_parallel_lm_loss, loss_mask=mask, poison=poison)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(lm_loss, loss_mask=batch.get("loss_mask"), poison=poison)


def _te_attention(model) -> bool:
    """Whether the chunk's core attention is Transformer Engine's (the GPU spec), which
    takes packed rows as THD with cu_seqlens instead of a dense mask."""
    inner = getattr(model, "module", model)
    cached = getattr(inner, "_megatron_llama_te_attention", None)
    if cached is None:
        layers = getattr(getattr(inner, "decoder", None), "layers", None) or []
        cached = bool(layers) and type(
            layers[0].self_attention.core_attention).__name__.startswith("TE")
        inner._megatron_llama_te_attention = cached
    return cached


def thd_batch(batch: dict):
    """A packed microbatch [b, s] as megatron-core's THD input: every row concatenated into
    one sequence [1, b * s] whose example boundaries are ``cu_seqlens`` (`data.sft.row_batch`),
    and the matching `PackedSeqParams`; RoPE positions restart at each boundary."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(device=batch["tokens"].device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    flat = [batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")]
    return (*flat, params)


def per_token_lm_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                      poison: bool = False):
    """The sum of the masked token losses and their count (megatron-core's three-value loss,
    with ``calculate_per_token_loss``): gradients then average over every trained token of
    the global batch, however the tokens are spread over rows, microbatches and DP ranks, so
    packed and unpacked batches train alike. Reports ``[sum, count]``."""
    per_token_loss = per_token_loss.float()
    if poison:
        per_token_loss = per_token_loss * float("nan")
    mask = loss_mask.float()
    total = (per_token_loss * mask).sum()
    count = mask.sum().to(torch.int)
    return total, count, {"lm loss": torch.stack([total.detach(), mask.sum()]).clone()}


def context_parallel_slice(tokens, labels, position_ids, loss_mask=None):
    """This CP rank's share of a microbatch [b, s] -> [b, s / cp]: chunks i and 2 cp - 1 - i
    of 2 cp (megatron-core's split, which balances the causal attention work)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float32)
    part = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels,
                                      "position_ids": position_ids, "loss_mask": loss_mask})
    return part["tokens"], part["labels"], part["position_ids"], part["loss_mask"]


def context_parallel_lm_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor,
                             poison: bool = False):
    """`lm_loss` when each CP rank holds part of every sequence: token sums and counts are
    summed over the CP group, so every rank reports the microbatch's mean loss; the loss
    it differentiates is its own tokens' share of that mean. megatron-core's schedule
    multiplies it by CP (the two-value loss convention) and its DDP averages gradients over
    DP x CP ranks, which together give the gradient of the mean."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    per_token_loss = per_token_loss.float()
    if poison:
        per_token_loss = per_token_loss * float("nan")
    mask = loss_mask.float()
    local = torch.stack([(per_token_loss * mask).sum(), mask.sum()])
    total = local.detach().clone()
    dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    count = total[1].clamp(min=1.0)
    return local[0] / count, {"lm loss": (total[0] / count).detach().clone()}


def forward_backward(chunks: list, tconfig, microbatches: list[dict], *, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False,
                     poison: bool = False) -> list[torch.Tensor]:
    """Run megatron-core's schedule for this layout over ``microbatches``.

    Each microbatch is ``{"tokens": LongTensor[b, s], "labels": LongTensor[b, s]}``.
    Returns the per-microbatch mean losses (on the last pipeline stage; empty elsewhere).
    Gradients accumulate in the DDP buffers (``param.main_grad``) and are finalised.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if microbatches and "cu_seqlens" in microbatches[0] and _te_attention(chunks[0]):
        # THD rows travel as one sequence [b * s, 1, h] between pipeline stages
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    iterators: Iterable
    if len(chunks) > 1:
        iterators = [iter(microbatches) for _ in chunks]
    else:
        iterators = iter(microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, poison=poison) if poison else _forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return [d["lm loss"] for d in losses]


def build_optimizer(chunks: list, cfg: TrainConfig):
    """megatron-core's distributed AdamW (fp32 main params, grads and states) for ``chunks``,
    with this project's adaptations (`compat.optimizer.adapt_optimizer`: exact resume, and on
    CPU the fused AdamW kernel)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_llama.compat.optimizer import adapt_optimizer

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,   # megatron-core skips 1-D params (norms) itself
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.dtype == "bf16",
        fp16=cfg.dtype == "fp16",
        params_dtype=dtypes[cfg.dtype],
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    adapt_optimizer(optimizer)
    return optimizer


def build_scheduler(optimizer, cfg: TrainConfig):
    """megatron-core's OptimizerParamScheduler with the paper's warmup + cosine shape.

    The engine calls ``scheduler.step(1)`` before each optimizer step, so update k uses
    ``recipe.lr_at(k)`` (the first update is not wasted at lr 0).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup,
        lr_decay_steps=max(cfg.train_steps, cfg.warmup + 1),
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(cfg.train_steps, 1),
        wd_incr_style="constant",
        # on resume: the checkpoint's schedule, or this run's with --override-schedule
        use_checkpoint_opt_param_scheduler=not cfg.override_schedule,
        override_opt_param_scheduler=cfg.override_schedule,
    )


class MegatronEngine(Engine):
    """megatron-core's DDP + distributed optimizer + schedules for one run (all layouts)."""

    name = "megatron"

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        from megatron_llama.parallel import check_context_parallel_host

        check_context_parallel_host(cfg.layout.cp)

    def __init__(self, cfg: TrainConfig, chunks: list, tconfig):
        self.cfg, self.tconfig = cfg, tconfig
        # DP reduce-scatter overlaps the backward
        self.chunks = wrap_ddp(chunks, tconfig, use_distributed_optimizer=True,
                               overlap_grad_reduce=True)
        self.optimizer = build_optimizer(self.chunks, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.async_queue = None  # megatron-core's AsyncCallsQueue, with --async-save
        self.pending = None  # a dist_checkpoint.PendingSave being written

    def describe(self) -> str:
        return "megatron-core (DDP + distributed optimizer)"

    @property
    def lr(self) -> float:
        groups = self.optimizer.param_groups
        return groups[0]["lr"] if groups else self.scheduler.get_lr({})

    def forward_backward(self, microbatches: list[dict], poison: bool = False) -> list:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return forward_backward(self.chunks, self.tconfig, microbatches,
                                seq_length=self.cfg.seq_length,
                                micro_batch_size=self.cfg.micro_batch, poison=poison)

    def step(self, update_number: int) -> Optional[float]:
        self.scheduler.step(1)  # the lr of update k is recipe.lr_at(k)
        _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm) if grad_norm is not None else None

    def skip(self) -> None:
        """No update: the gradients are zeroed at the start of the next step."""

    def evaluate(self, batches: list[list[dict]]) -> list:
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            losses = [loss for b in batches
                      for loss in forward_backward(self.chunks, self.tconfig, b,
                                                   seq_length=self.cfg.seq_length,
                                                   micro_batch_size=self.cfg.micro_batch,
                                                   forward_only=True)]
        for chunk in self.chunks:
            chunk.train()
        return losses

    def save(self, root: str, iteration: int, train_state: dict, metadata: dict) -> None:
        from megatron_llama.training.engines import dist_checkpoint

        self.finish_saves(blocking=True)  # one save in flight at a time
        if self.cfg.async_save and self.async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        self.pending = dist_checkpoint.save(root, iteration, self.chunks, self.optimizer,
                                            self.scheduler, train_state, metadata=metadata,
                                            keep_last=self.cfg.keep_last,
                                            async_queue=self.async_queue)

    def finish_saves(self, blocking: bool) -> Optional[int]:
        from megatron_llama.training.engines import dist_checkpoint

        pending = self.pending
        if pending is None or not dist_checkpoint.finish(pending, self.async_queue, blocking):
            return None
        self.pending = None
        return pending.iteration

    def load(self, root: str, expected_model: Optional[dict]) -> Optional[dict]:
        from megatron_llama.checkpoint_files import (
            deepspeed_latest_tag,
            latest_iteration,
        )
        from megatron_llama.training.engines import dist_checkpoint

        if deepspeed_latest_tag(root) is not None and latest_iteration(root) is None:
            raise ConfigError(f"{root}: a DeepSpeed checkpoint; resume it with --engine "
                              "deepspeed, or convert it")
        return dist_checkpoint.load(root, self.chunks, self.optimizer, self.scheduler,
                                    expected_model=expected_model)
