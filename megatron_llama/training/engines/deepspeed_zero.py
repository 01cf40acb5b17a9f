"""The DeepSpeed engine: ZeRO-1/2/3 data parallelism around the same megatron-core GPTModel.

The model is exactly the one the megatron-core engine trains (`model.build.build_model`: LLaMA's
layer spec, megatron-core's tensor-parallel layers). DeepSpeed takes over what megatron-core's
DDP and distributed optimizer do otherwise: gradient averaging over the data-parallel group,
sharding of optimizer states (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3), optional
optimizer offload to the CPU, clipping, and checkpoints. megatron-core's process groups are
handed to DeepSpeed through `MegatronMPU`, so DeepSpeed's data-parallel group excludes the
tensor-parallel ranks and its gradient norm counts TP-sharded weights once per shard.

Limits (refused with one line by `DeepSpeedEngine.check`): no pipeline parallelism (DeepSpeed's pipeline
engine needs its own PipelineModule) and no sequence parallelism (the SP norm-gradient
all-reduce is part of megatron-core's DDP, which DeepSpeed replaces).

The recipe is the same: AdamW (0.9, 0.95, eps 1e-8, wd 0.1 on matrices only), clipping 1.0,
and the learning rate of `recipe.lr_at` set on the optimizer before every update.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import torch

from megatron_llama.checkpoint_files import (
    DEEPSPEED_LATEST,
    METADATA,
    TAG_PREFIX,
    deepspeed_latest_tag,
    is_megatron_root,
    iteration_tag,
)
from megatron_llama.errors import (
    ConfigError,
    check_installed,
    read_json_object,
    require,
)
from megatron_llama.fileio import write_json, write_text
from megatron_llama.model.config import model_differences
from megatron_llama.training.engines.base import Engine, lm_loss, on_model_device
from megatron_llama.training.engines.verified import (
    choose_iteration,
    describe_write_error,
    injected_write_failure,
    prune,
    record_checksums,
    save_failed,
)
from megatron_llama.training.recipe import TrainConfig, lr_at


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed's ``mpu`` argument expects."""

    def __getattr__(self, name: str):
        from megatron.core import parallel_state as ps

        aliases = {"get_model_parallel_group": ps.get_tensor_model_parallel_group,
                   "get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
                   "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
                   "get_model_parallel_src_rank": ps.get_tensor_model_parallel_src_rank,
                   "get_sequence_parallel_world_size": lambda: 1,
                   "get_sequence_parallel_rank": lambda: 0}
        if name in aliases:
            return aliases[name]
        return getattr(ps, name)


def check_config(cfg: TrainConfig) -> None:
    """Refuse what the DeepSpeed engine cannot run, with one line."""
    check_installed("deepspeed", "--engine deepspeed")
    if cfg.zero_stage not in (1, 2, 3):
        raise ConfigError(f"--zero-stage must be 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.layout.pp > 1:
        raise ConfigError("--engine deepspeed runs without pipeline parallelism (--pp 1): "
                          "DeepSpeed's pipeline engine needs its own PipelineModule")
    if cfg.layout.sp:
        raise ConfigError("--engine deepspeed runs without --sp: the sequence-parallel norm "
                          "gradient reduction belongs to megatron-core's DDP")
    if cfg.layout.cp > 1:
        raise ConfigError("--engine deepspeed runs without --cp: context parallelism's "
                          "gradient averaging over DP x CP belongs to megatron-core's DDP")
    if cfg.async_save:
        raise ConfigError("--async-save is megatron-core's asynchronous dist_checkpointing; "
                          "the DeepSpeed engine saves synchronously (drop --async-save)")
    if cfg.deepspeed_config and not os.path.isfile(cfg.deepspeed_config):
        raise ConfigError(f"{cfg.deepspeed_config}: DeepSpeed config not found")


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict:
    """DeepSpeed's JSON config from our flags, then ``--deepspeed-config`` merged over it."""
    accumulation = cfg.global_batch // (cfg.micro_batch * dp_size)
    config: dict = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16", "initial_scale_power": 16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_eps,
            "weight_decay": cfg.weight_decay,
            # torch's AdamW unless offloaded (DeepSpeed's CPU Adam then); its FusedAdam is CUDA
            "torch_adam": not cfg.offload_optimizer}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed_config:
        with open(cfg.deepspeed_config, encoding="utf-8") as f:
            try:
                override = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{cfg.deepspeed_config}: not valid JSON ({e})") from None
        _merge(config, override)
    return config


def _merge(base: dict, override: dict) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as megatron-core's optimizer does (no decay on norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class DeepSpeedEngine(Engine):
    """Train step, evaluation and checkpoints of one model under DeepSpeed (see module doc)."""

    name = "deepspeed"

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        check_config(cfg)

    def __init__(self, cfg: TrainConfig, chunks: list, tconfig=None):
        from megatron.core import parallel_state as ps

        deepspeed = require("deepspeed", "--engine deepspeed")

        if len(chunks) != 1:
            raise ConfigError("--engine deepspeed trains one model chunk (no virtual stages)")
        model = chunks[0]
        self.cfg = cfg
        self.schedule = cfg  # what `lr_at` reads; a resume may keep the checkpoint's
        self.config = deepspeed_config(cfg, ps.get_data_parallel_world_size())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay),
            config=self.config, mpu=MegatronMPU(), dist_init_required=False)
        self.accumulation = self.config["gradient_accumulation_steps"]

    def describe(self) -> str:
        offload = " (optimizer offload)" if self.cfg.offload_optimizer else ""
        return f"DeepSpeed ZeRO-{self.cfg.zero_stage}{offload}"

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _loss(self, batch: dict, poison: bool = False) -> torch.Tensor:
        batch = on_model_device(batch, self.engine.module)
        tokens, labels = batch["tokens"], batch["labels"]
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        per_token = self.engine(tokens, positions, None, labels=labels)
        return lm_loss(per_token, batch.get("loss_mask"), poison=poison)[0]

    def forward_backward(self, microbatches: list[dict], poison: bool = False) -> list:
        """Forward and backward over this rank's microbatches (DeepSpeed averages them)."""
        if len(microbatches) != self.accumulation:
            raise RuntimeError(f"{len(microbatches)} microbatches, DeepSpeed expects "
                               f"{self.accumulation}")
        losses = []
        for i, batch in enumerate(microbatches):
            loss = self._loss(batch, poison)
            self.engine.backward(loss)
            losses.append(loss.detach().clone())
            if i < len(microbatches) - 1:
                self.engine.step()  # only counts the micro step: not a boundary
        return losses

    def step(self, update_number: int) -> Optional[float]:
        """The optimizer step at the accumulation boundary, at the paper's lr for it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(update_number, self.schedule)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def skip(self) -> None:
        """End the step without an update: DeepSpeed itself skips a non-finite gradient."""
        skipped = self.engine.skipped_steps
        self.engine.step()
        if self.engine.skipped_steps == skipped:
            raise RuntimeError("DeepSpeed applied an update with a non-finite loss")

    def evaluate(self, batches: list[list[dict]]) -> list:
        self.engine.eval()
        with torch.no_grad():
            losses = [self._loss(b).detach() for group in batches for b in group]
        self.engine.train()
        return losses

    def save(self, root: str, iteration: int, train_state: dict, metadata: dict) -> None:
        """DeepSpeed's checkpoint (``<root>/iter_N``, ``latest``) plus our metadata file."""
        import torch.distributed as dist

        tag = iteration_tag(iteration)
        # `latest` is written last, by us: it names a checkpoint only once every rank's files
        # and the metadata are complete (a crash before leaves the previous one as latest)
        try:
            injected_write_failure(iteration, dist.get_rank())
            self.engine.save_checkpoint(root, tag=tag, client_state={"train_state": train_state},
                                        save_latest=False)
        except OSError as e:
            # this rank stops with one line; the launcher (or srun --kill-on-bad-exit) ends
            # the others, `latest` still names the previous checkpoint, and the next run
            # removes the unfinished folder (`verified.remove_failed_saves`)
            raise ConfigError(save_failed(root, iteration, describe_write_error(e),
                                          removed=False)) from None
        dist.barrier()
        files = record_checksums(os.path.join(root, tag))
        if dist.get_rank() == 0:
            write_json({**metadata, "engine": "deepspeed", "zero_stage": self.cfg.zero_stage,
                        "iteration": iteration, **train_state, "files": files},
                       os.path.join(root, tag, METADATA))
            write_text(os.path.join(root, DEEPSPEED_LATEST), tag)
            prune(root, self.cfg.keep_last, iteration)
        dist.barrier()

    def load(self, root: str, expected_model: Optional[dict]) -> Optional[dict]:
        """Resume from ``<root>/latest``; None when there is no DeepSpeed checkpoint."""
        tag = deepspeed_latest_tag(root)
        if tag is None:
            if is_megatron_root(root):
                raise ConfigError(f"{root}: a megatron-core checkpoint; resume it with --engine "
                                  "megatron, or convert it")
            return None
        if re.fullmatch(rf"{TAG_PREFIX}\d+", tag):  # ours: verify, fall back if damaged
            tag = iteration_tag(choose_iteration(root, int(tag[len(TAG_PREFIX):])))
        meta_path = os.path.join(root, tag, METADATA)
        if expected_model is not None and os.path.isfile(meta_path):
            saved = read_json_object(meta_path).get("model")
            if saved is None or model_differences(saved, expected_model):
                raise ConfigError(f"{meta_path}: checkpoint of another model ({saved}); "
                                  "refusing to load it")
        if not isinstance(self.engine.checkpoint_engine, _WeightsOnlyLoads):
            self.engine.checkpoint_engine = _WeightsOnlyLoads(self.engine.checkpoint_engine)
        path, client = self.engine.load_checkpoint(root, tag=tag)
        if path is None:
            raise ConfigError(f"{os.path.join(root, tag)}: DeepSpeed could not load it")
        saved = client["train_state"].get("schedule")
        if saved and not self.cfg.override_schedule:  # continue the checkpoint's schedule
            self.schedule = dataclasses.replace(self.cfg, **saved)
        return client["train_state"]


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with a `load` that never unpickles code.

    DeepSpeed's own `TorchCheckpointEngine.load` calls ``torch.load(weights_only=False)``;
    this wrapper loads with ``weights_only=True``, allowing only DeepSpeed's plain data
    classes (`compat.safe_loading.deepspeed_safe_globals`), and delegates everything else.
    """

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        import pickle

        from megatron_llama.compat.safe_loading import deepspeed_safe_globals

        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{path}: refused: loading it would run pickled code "
                              f"({str(e).splitlines()[0][:120]})") from None
