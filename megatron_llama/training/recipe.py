"""The paper's training recipe: the run configuration and the warmup + cosine schedule.

Paper (section 2.3, docs/llama-paper.md): AdamW with beta1 0.9, beta2 0.95, weight decay 0.1,
gradient clipping 1.0, 2000 warmup steps, cosine decay to 10 % of the peak learning rate,
batches of 4M tokens, peak lr per model size (Table 2). Every default here follows that.

Each `TrainConfig` field carries its command-line help in its metadata (`option`), so its
default and its explanation are written once: `training.commands` builds the `pretrain` flags
from these fields. The engines read this module (the configuration and `lr_at`); it imports
no engine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig
from megatron_llama.model.presets import Preset
from megatron_llama.parallel import ParallelLayout

ENGINES = ("megatron", "deepspeed")  # implemented in training/engines/


def option(default: Any, help: str, *, group: str, flag: Optional[str] = None,
           choices: Optional[tuple] = None, derived: bool = False,
           nargs: Optional[str] = None) -> Any:
    """A `TrainConfig` field with its command-line flag.

    ``help`` explains the flag; the default is appended as "(default)" unless ``derived``:
    the CLI then leaves the value unset (None) and `training.commands` derives it from the
    preset or the host, as ``help`` says. ``flag`` overrides the name made from the field's
    (``warmup_steps`` -> ``--warmup-steps``)."""
    return field(default=default, metadata={"help": help, "group": group, "flag": flag,
                                            "choices": choices, "derived": derived,
                                            "nargs": nargs})


# The flag groups of `pretrain --help`, in order (model and parallelism come from LlamaConfig
# and ParallelLayout, see `training.commands`).
GROUPS = {
    "engine": "engine",
    "recipe": "recipe (defaults: the paper's)",
    "data": "data",
    "checkpoints": "checkpoints",
    "reliability": "fault tolerance",
    "logging": "evaluation and logging",
}


@dataclass
class TrainConfig:
    """Everything one pretraining run needs; filled by the CLI (`training.commands`) or tests."""

    model: LlamaConfig
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    seq_length: int = option(2048, "tokens per sequence (default: the model's max_seq_len)",
                             group="recipe", derived=True)
    micro_batch: int = option(1, "sequences per microbatch", group="recipe")
    global_batch: int = option(2048, "sequences per step (default: 4M tokens / seq-length)",
                               group="recipe", derived=True)  # 2048 x 2048 = 4M tokens
    train_steps: int = option(1000, "optimizer steps (default: the preset's token budget / "
                              "global batch)", group="recipe", derived=True)
    lr: float = option(3e-4, "peak learning rate (default: the preset's)", group="recipe",
                       derived=True)
    min_lr_ratio: float = option(0.1, "cosine floor / peak", group="recipe")
    warmup_steps: int = option(2000, "linear warmup steps", group="recipe")
    weight_decay: float = option(0.1, "AdamW decay, not on norms (1-D parameters)",
                                 group="recipe")
    adam_beta1: float = option(0.9, "AdamW beta1", group="recipe")
    adam_beta2: float = option(0.95, "AdamW beta2", group="recipe")
    adam_eps: float = option(1e-8, "AdamW epsilon", group="recipe")
    clip_grad: float = option(1.0, "gradient norm clipping", group="recipe")
    dtype: str = option("bf16", "parameter/compute precision; main weights stay fp32 (default: "
                        "bf16 on GPU, fp32 on CPU where bf16 is ~20x slower)", group="recipe",
                        choices=("bf16", "fp16", "fp32"), derived=True)
    recompute: str = option("none", "activation recompute", group="recipe",
                            choices=("none", "selective", "full"))
    seed: int = option(1234, "random seed", group="recipe")
    # data
    data_blend: Union[str, list, None] = option(
        None, "a blend YAML, one dataset prefix (PREFIX.bin/.idx from `megatron-llama "
        "preprocess`), or weight/prefix pairs: --data 0.3 data/code 0.7 data/prose",
        group="data", flag="--data", nargs="+")
    tokenizer: Optional[str] = option(None, "tokenizer.model of the data (SentencePiece or tiktoken)",
                                      group="data")
    # checkpoints
    save_dir: Optional[str] = option(None, "checkpoint directory (dist_checkpointing)",
                                     group="checkpoints", flag="--save")
    save_interval: int = option(0, "save every N steps; 0 = only at the end and on "
                                "SIGTERM/SIGUSR1", group="checkpoints")
    load_dir: Optional[str] = option(None, "resume from the latest checkpoint here (default: "
                                     "--save, if it has one)", group="checkpoints",
                                     flag="--load", derived=True)
    keep_last: int = option(0, "keep only the N newest checkpoints: older ones are removed once "
                            "a newer one is complete and verified; 0 keeps all",
                            group="checkpoints")
    async_save: bool = option(False, "write checkpoints in the background (megatron-core's "
                              "asynchronous dist_checkpointing): training continues while "
                              "each rank's writer process writes; committed as latest only "
                              "once every rank is done", group="checkpoints")
    # fault tolerance
    hang_timeout: Optional[float] = option(
        None, "seconds without a finished step after which a rank prints the Python stack of "
        "each thread and exits 124 (so Slurm requeues); 0 disables (default: max(300 s, 20 x "
        "the slowest step); start-up, loads, saves and evaluations get at least 1800 s)",
        group="reliability", derived=True)
    # evaluation and logging
    eval_interval: int = option(0, "validate every N steps; 0 = never", group="logging")
    eval_iters: int = option(4, "validation global batches", group="logging")
    log_interval: int = option(1, "log every N steps", group="logging")
    log_file: Optional[str] = option(None, "JSONL log (default <save>/log.jsonl)",
                                     group="logging")
    wandb_project: Optional[str] = option(None, "log to wandb (offline unless WANDB_API_KEY "
                                          "is set)", group="logging")
    wandb_run: Optional[str] = option(None, "wandb run name", group="logging")
    peak_tflops: Optional[float] = option(None, "peak TFLOP/s per device for MFU (default: "
                                          "known GPU, or CPU measured)", group="logging")
    nan_policy: str = option("skip", "a non-finite loss skips the update or stops the run",
                             group="logging", flag="--on-nan", choices=("skip", "stop"))
    exit_after_steps: Optional[int] = option(None, "save and exit after this many steps of "
                                             "this process", group="logging")
    # engine: megatron-core DDP + distributed optimizer, or DeepSpeed ZeRO
    engine: str = option("megatron", "megatron: megatron-core DDP + distributed optimizer (all "
                         "layouts); deepspeed: DeepSpeed ZeRO data parallelism around the same "
                         "model (TP without SP; no PP)", group="engine", choices=ENGINES)
    zero_stage: int = option(1, "DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also "
                             "gradients, 3 also parameters", group="engine", choices=(1, 2, 3))
    offload_optimizer: bool = option(False, "DeepSpeed: keep optimizer states on the CPU and "
                                     "step there", group="engine")
    deepspeed_config: Optional[str] = option(None, "DeepSpeed JSON merged over the config "
                                             "generated from these flags", group="engine")
    override_schedule: bool = option(False, "on resume, re-plan the lr schedule from these flags "
                                     "(default: continue the checkpoint's, with a warning "
                                     "when they differ)", group="recipe")
    skip_memory_check: bool = option(False, "start even when the predicted memory per rank "
                                     "exceeds what this host has", group="engine")

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @property
    def warmup(self) -> int:
        """Warmup steps actually used: shortened so at least one step decays."""
        return max(0, min(self.warmup_steps, self.train_steps - 1))

    def check(self, world_size: int) -> None:
        """Refuse impossible runs before any work, with one line (the engine-agnostic rules;
        `training.engines.check` adds the chosen engine's own)."""
        self.layout.check(self.model, world_size, self.micro_batch, self.global_batch)
        if self.seq_length > self.model.max_seq_len:
            raise ConfigError(f"seq_length {self.seq_length} exceeds the model's max_seq_len "
                              f"{self.model.max_seq_len}")
        if self.layout.sp and (self.seq_length // self.layout.cp) % self.layout.tp:
            raise ConfigError(f"sequence parallelism needs seq_length / CP divisible by "
                              f"TP={self.layout.tp}")
        if self.layout.cp > 1 and self.seq_length % (2 * self.layout.cp):
            raise ConfigError(f"context parallelism splits each sequence into 2 x CP = "
                              f"{2 * self.layout.cp} chunks: seq_length {self.seq_length} is "
                              "not divisible")
        if self.nan_policy not in ("skip", "stop"):
            raise ConfigError(f"nan policy must be skip or stop, got {self.nan_policy!r}")
        if self.train_steps < 1:
            raise ConfigError("train steps must be >= 1")
        if self.keep_last < 0 or (self.hang_timeout is not None and self.hang_timeout < 0):
            raise ConfigError("--keep-last and --hang-timeout must be >= 0")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be {' or '.join(ENGINES)}, got {self.engine!r}")

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> "TrainConfig":
        """The paper's defaults for ``preset``: its lr and a 4M-token global batch."""
        model = overrides.pop("model", preset.model)
        seq = overrides.pop("seq_length", model.max_seq_len)
        defaults = dict(lr=preset.lr, seq_length=seq,
                        global_batch=max(1, preset.batch_tokens // seq))
        defaults.update(overrides)
        return cls(model=model, **defaults)


SCHEDULE_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "train_steps")


def schedule_of(cfg: TrainConfig) -> dict:
    """What fixes the lr schedule, as saved with every checkpoint's train state."""
    return {name: getattr(cfg, name) for name in SCHEDULE_FIELDS}


def describe_schedule(schedule: dict) -> str:
    s = schedule
    return (f"peak {s['lr']:.3g}, {s['warmup_steps']} warmup steps, cosine to "
            f"{s['min_lr_ratio']:.0%} at step {s['train_steps']}")


def cli_fields() -> list[dataclasses.Field]:
    """The `TrainConfig` fields that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The paper's schedule in closed form: linear warmup, then cosine to min_lr.

    ``step`` counts optimizer updates from 1. The DeepSpeed engine sets it on the optimizer;
    the tests check megatron-core's scheduler against it.
    """
    if cfg.warmup > 0 and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if step >= cfg.train_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup) / (cfg.train_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
