"""The paper's training recipe: run configuration, AdamW, and the warmup + cosine schedule.

Paper (section 2.2): AdamW with beta1 0.9, beta2 0.95, weight decay 0.1, gradient clipping
1.0, 2000 warmup steps, cosine decay to 10 % of the peak learning rate, batches of 4M
tokens, peak lr per model size (Table 2). Every default here follows that and every one is
overridable from the command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_llama.config import ConfigError, LlamaConfig, Preset
from megatron_llama.parallel import ParallelLayout


@dataclass
class TrainConfig:
    """Everything one pretraining run needs; filled by the CLI or by tests."""

    model: LlamaConfig
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    seq_length: int = 2048
    micro_batch: int = 1
    global_batch: int = 2048          # sequences; 2048 x 2048 = 4M tokens
    train_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1         # cosine decays to 10 % of the peak
    warmup_steps: int = 2000
    weight_decay: float = 0.1         # not applied to norm weights (1-D parameters)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    dtype: str = "bf16"               # model params/compute; main weights are fp32
    recompute: str = "none"           # none | selective | full
    seed: int = 1234
    # data
    data_blend: Optional[str] = None  # YAML blend; None = synthetic tokens
    tokenizer: Optional[str] = None
    # checkpoints
    save_dir: Optional[str] = None
    save_interval: int = 0            # 0 = only at the end and on signals
    load_dir: Optional[str] = None
    # evaluation and logging
    eval_interval: int = 0
    eval_iters: int = 4
    log_interval: int = 1
    log_file: Optional[str] = None    # JSONL; default <save_dir>/log.jsonl
    wandb_project: Optional[str] = None
    wandb_run: Optional[str] = None
    peak_tflops: Optional[float] = None  # per GPU; None = known GPU table / CPU measurement
    nan_policy: str = "skip"          # skip | stop
    exit_after_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps
    # engine: megatron-core DDP + distributed optimizer, or DeepSpeed ZeRO
    engine: str = "megatron"          # megatron | deepspeed
    zero_stage: int = 1               # DeepSpeed ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False   # DeepSpeed: optimizer states and step on the CPU
    deepspeed_config: Optional[str] = None  # JSON merged over the generated DeepSpeed config

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @property
    def warmup(self) -> int:
        """Warmup steps actually used: shortened so at least one step decays."""
        return max(0, min(self.warmup_steps, self.train_steps - 1))

    def check(self, world_size: int) -> None:
        """Refuse impossible runs before any work, with one line."""
        self.layout.check(self.model, world_size, self.micro_batch, self.global_batch)
        if self.seq_length > self.model.max_seq_len:
            raise ConfigError(f"seq_length {self.seq_length} exceeds the model's max_seq_len "
                              f"{self.model.max_seq_len}")
        if self.layout.sp and self.seq_length % self.layout.tp:
            raise ConfigError(f"sequence parallelism needs seq_length divisible by TP={self.layout.tp}")
        if self.nan_policy not in ("skip", "stop"):
            raise ConfigError(f"nan policy must be skip or stop, got {self.nan_policy!r}")
        if self.train_steps < 1:
            raise ConfigError("train steps must be >= 1")
        if self.engine not in ("megatron", "deepspeed"):
            raise ConfigError(f"engine must be megatron or deepspeed, got {self.engine!r}")
        if self.engine == "deepspeed":
            from megatron_llama.engines.deepspeed import check

            check(self)

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> "TrainConfig":
        """The paper's defaults for ``preset``: its lr and a 4M-token global batch."""
        model = overrides.pop("model", preset.model)
        seq = overrides.pop("seq_length", model.max_seq_len)
        defaults = dict(lr=preset.lr, seq_length=seq,
                        global_batch=max(1, preset.batch_tokens // seq))
        defaults.update(overrides)
        return cls(model=model, **defaults)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The paper's schedule in closed form: linear warmup, then cosine to min_lr.

    ``step`` counts optimizer updates from 1. Used to check megatron-core's scheduler.
    """
    if cfg.warmup > 0 and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if step >= cfg.train_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup) / (cfg.train_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(chunks: list, cfg: TrainConfig):
    """megatron-core's distributed AdamW (fp32 main params, grads and states) for ``chunks``."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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
    from megatron_llama.engines.optimizer_fix import fix_distributed_optimizer

    optimizer = get_megatron_optimizer(config, chunks)
    fix_distributed_optimizer(optimizer)  # megatron-core 0.16.1 resume bugs without TE/apex
    if not torch.cuda.is_available():
        use_fused_cpu_adamw(optimizer)
    skip_fp32_self_copies(optimizer)
    return optimizer


def skip_fp32_self_copies(optimizer) -> int:
    """Drop the distributed optimizer's copy of fp32 main shards onto themselves.

    With fp32 model weights megatron-core's main "copies" are views of the weights, yet after
    every step ``_copy_main_params_to_model_params`` copies each shard onto the very same
    memory: one pointless pass over all weights per step (fp32 is the CPU default). When
    every fp32 pair shares memory and there are no 16-bit groups, the copy is skipped for
    that optimizer; anything else keeps megatron-core's method. Returns how many were changed.
    """
    from megatron_llama.engines.optimizer_fix import _distributed_optimizers

    changed = 0
    for dist_opt in _distributed_optimizers(optimizer):
        if any(g for g in getattr(dist_opt, "model_float16_groups", [[]]) if g):
            continue
        pairs = []
        for shard_group, model_group in zip(dist_opt.shard_fp32_groups, dist_opt.model_fp32_groups):
            for shard_main, model_param in zip(shard_group, model_group):
                gbuf, _, bucket = dist_opt.model_param_gbuf_map[model_param]
                world = dist_opt._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                target = dist_opt.buffers[gbuf].buckets[bucket].param_data.view(-1)[
                    world.start:world.end]
                pairs.append(target.data_ptr() == shard_main.data_ptr())
        if pairs and all(pairs):
            dist_opt._copy_main_params_to_model_params = lambda: None
            changed += 1
    return changed


def use_fused_cpu_adamw(optimizer) -> int:
    """Switch torch AdamW inside megatron-core's optimizer to torch's fused CPU kernel.

    megatron-core builds ``torch.optim.AdamW`` without ``fused`` when TE/apex are absent, so
    on CPU every parameter shard takes the per-tensor Python loop (~10 elementwise passes
    over the fp32 states: ~9 % of a step at 60M parameters). The fused kernel does the same
    update in one pass per tensor. The flag is read at every ``step()``; the eagerly created
    state (0-d float32 ``step`` on the CPU) is what the fused path expects. Returns the
    number of torch optimizers switched.
    """
    import torch

    switched = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW) or inner.defaults.get("differentiable"):
            continue
        if any(p.is_cuda for g in inner.param_groups for p in g["params"]):
            continue
        inner.defaults.update(fused=True, foreach=None)
        for group in inner.param_groups:
            group.update(fused=True, foreach=None)
        switched += 1
    return switched


def build_scheduler(optimizer, cfg: TrainConfig):
    """megatron-core's OptimizerParamScheduler with the paper's warmup + cosine shape.

    The training loop calls ``scheduler.step(1)`` before each optimizer step, so update k
    uses ``lr_at(k)`` (the first update is not wasted at lr 0).
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
    )
