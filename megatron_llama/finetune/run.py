"""A fine-tuning run: pretraining's loop with a starting checkpoint, instruction rows, a
per-token loss over the whole global batch, and optionally LoRA adapters over a frozen base.

Everything the loop does for pretraining (checkpoints and exact resume, signals, the hang
watchdog, logs, plots, wandb) it does here too; `RunHooks` supplies what differs:

- the model starts from ``--from`` (Meta, Hugging Face or megatron-llama, any generation),
  read straight into this rank's TP/PP/VP slice one layer at a time
  (`model.build.load_weights`): nothing is converted on disk, and no rank reads layers it
  does not hold;
- batches are `data.sft.SFTData` rows (packed or not) with the response-only loss mask;
- the loss is megatron-core's per-token form (``calculate_per_token_loss``): every trained
  token of the global batch weighs the same, however rows and microbatches split them;
- with LoRA, adapters are added after the base is loaded and everything else is frozen;
  checkpoints then hold the adapters only, and the base is reloaded from ``--from`` on
  resume.
"""

from __future__ import annotations

import os
import sys
from functools import partial

from megatron_llama.errors import ConfigError
from megatron_llama.finetune.recipe import FinetuneOptions, LoraSettings
from megatron_llama.model.canonical import shape_mismatch
from megatron_llama.model.config import LlamaConfig
from megatron_llama.training.loop import RunHooks, pretrain
from megatron_llama.training.recipe import TrainConfig


def lora_parameter_count(model: LlamaConfig, lora: LoraSettings) -> int:
    """Adapter parameters of the whole model: rank x (in + out) per target per layer."""
    q, kv = model.n_heads * model.head_dim, model.num_kv_heads * model.head_dim
    ffn = model.ffn_hidden_size
    sizes = {"linear_qkv": (model.dim, q + 2 * kv), "linear_proj": (q, model.dim),
             "linear_fc1": (model.dim, 2 * ffn), "linear_fc2": (ffn, model.dim)}
    return model.n_layers * sum(lora.rank * sum(sizes[t]) for t in lora.targets)


def _prepare_model(cfg: TrainConfig, opts: FinetuneOptions, chunks: list, resuming: bool) -> None:
    from megatron_llama.convert.run import open_source
    from megatron_llama.model.build import load_weights

    rank0 = int(os.environ.get("RANK", 0)) == 0
    if not resuming or opts.lora is not None:  # LoRA checkpoints hold no base weights
        with open_source(opts.init_from) as source:
            problems = shape_mismatch(source.config, cfg.model)
            if problems:
                raise ConfigError(f"{opts.init_from}: does not fit the model "
                                  f"({'; '.join(problems[:2])})")
            if rank0:
                print(f"loading {opts.init_from} ({source.description}) into this layout",
                      flush=True)
            load_weights(chunks, cfg.model, source.tensor)
    if opts.lora is not None:
        from megatron_llama.model.lora import add_adapters

        if resuming:
            _check_saved_lora(cfg.load_dir, opts.lora, opts.init_from)
        lora = opts.lora
        add_adapters(chunks, lora.rank, lora.alpha, lora.dropout, tuple(lora.targets), cfg.seed)
        if rank0:
            n, total = lora_parameter_count(cfg.model, lora), cfg.model.num_params()
            print(f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on "
                  f"{', '.join(lora.targets)}: {n:,} trainable parameters ({100 * n / total:.2f} "
                  f"% of {total:,}); the base is frozen", flush=True)


def _check_saved_lora(root: str, lora: LoraSettings, init_from: str) -> None:
    from megatron_llama.checkpoint_files import (
        iteration_dir,
        latest_iteration,
        read_checkpoint_metadata,
    )

    iteration = latest_iteration(root)
    if iteration is None:
        return
    meta = read_checkpoint_metadata(iteration_dir(root, iteration))
    saved = meta.get("lora")
    if meta.get("base") and os.path.abspath(meta["base"]) != os.path.abspath(init_from):
        raise ConfigError(f"{root}: its adapters were trained on {meta['base']}; resume with "
                          f"--from {meta['base']} (or start another --save)")
    if saved is not None and saved != lora.to_dict():
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in lora.to_dict().items()
                            if saved.get(k) != v)
        raise ConfigError(f"{root}: its adapters were trained with other LoRA settings "
                          f"({changed}); resume with the same flags or use another --save")


def _build_data(opts: FinetuneOptions, cfg: TrainConfig, dp_size: int, dp_rank: int, tokenizer):
    from megatron_llama.data.sft import SFTData

    return SFTData(opts.data_prefix, seq_length=cfg.seq_length, global_batch=cfg.global_batch,
                   micro_batch=cfg.micro_batch, dp_size=dp_size, dp_rank=dp_rank,
                   valid_fraction=opts.valid_fraction, seed=cfg.seed, packed=opts.packed,
                   pad_id=tokenizer.eos_id if tokenizer is not None else 0)


def finetune_hooks(cfg: TrainConfig, opts: FinetuneOptions) -> RunHooks:
    metadata = {"finetune": {"from": os.path.abspath(opts.init_from), "recipe": opts.recipe,
                             "data": os.path.abspath(opts.data_prefix), "packed": opts.packed}}
    if opts.lora is not None:
        metadata.update(adapters_only=True, lora=opts.lora.to_dict(),
                        base=os.path.abspath(opts.init_from))
    return RunHooks(title="fine-tuning", validate_at_end=True, prepare_model=partial(_prepare_model, cfg, opts),
                    build_data=partial(_build_data, opts),
                    transformer_overrides={"calculate_per_token_loss": True},
                    metadata=metadata)


def check_finetune(cfg: TrainConfig, opts: FinetuneOptions) -> None:
    """What fine-tuning refuses beyond pretraining's checks (one line each)."""
    if cfg.engine != "megatron":
        raise ConfigError("finetune runs on the megatron engine (its per-token loss over the "
                          "global batch and LoRA's frozen base); drop --engine deepspeed")
    if cfg.layout.cp > 1:
        raise ConfigError("finetune: context parallelism is not supported with packed rows "
                          "(drop --cp)")
    if opts.lora is not None:
        opts.lora.check()


def finetune(cfg: TrainConfig, opts: FinetuneOptions) -> dict:
    """Run (or resume) fine-tuning; returns the loop's summary."""
    check_finetune(cfg, opts)
    summary = pretrain(cfg, finetune_hooks(cfg, opts))
    if int(os.environ.get("RANK", 0)) == 0 and cfg.save_dir and summary.get("status"):
        how = ("`megatron-llama merge-lora --input {d} --to hf --output OUT`" if opts.lora
               else "`megatron-llama convert --input {d} --to hf --output OUT`")
        print(f"export with {how.format(d=cfg.save_dir)}", file=sys.stderr, flush=True)
    return summary
