"""Command-line flags of `megatron-llama pretrain` and their mapping onto `TrainConfig`."""

from __future__ import annotations

import argparse

from megatron_llama.config import get_preset
from megatron_llama.parallel import ParallelLayout
from megatron_llama.training.recipe import TrainConfig

MODEL_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                "ffn_dim_multiplier", "norm_eps", "max_seq_len", "rope_theta")


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (a preset plus overrides, Meta's field names)")
    m.add_argument("--preset", default="tiny", help="tiny, 7B, 13B, 33B or 65B (tiny)")
    for name in MODEL_FIELDS:
        kind = float if name in ("ffn_dim_multiplier", "norm_eps", "rope_theta") else int
        m.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"override the preset's {name}")
    par = p.add_argument_group("parallelism (megatron-core)")
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    par.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    par.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    par.add_argument("--vp", type=int, default=None,
                     help="virtual pipeline stages per rank (interleaved 1F1B)")
    par.add_argument("--nproc-per-node", type=int, default=None,
                     help="start this many local processes (torchrun) when not already "
                          "launched by torchrun or srun")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                   help="megatron: megatron-core DDP + distributed optimizer (default; all "
                        "layouts); deepspeed: DeepSpeed ZeRO data parallelism around the same "
                        "model (TP without SP; no PP)")
    e.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=1,
                   help="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, "
                        "3 also parameters (1)")
    e.add_argument("--offload-optimizer", action="store_true",
                   help="DeepSpeed: keep optimizer states on the CPU and step there")
    e.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON merged over the config generated from these flags")
    r = p.add_argument_group("recipe (defaults: the paper's)")
    r.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (max_seq_len)")
    r.add_argument("--micro-batch", type=int, default=1, help="sequences per microbatch (1)")
    r.add_argument("--global-batch", type=int, default=None,
                   help="sequences per step (default: 4M tokens / seq-length)")
    r.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps (default: the preset's token budget / global batch)")
    r.add_argument("--lr", type=float, default=None, help="peak learning rate (preset's)")
    r.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor / peak (0.1)")
    r.add_argument("--warmup-steps", type=int, default=2000, help="linear warmup steps (2000)")
    r.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay, not on norms (0.1)")
    r.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (1.0)")
    r.add_argument("--adam-beta1", type=float, default=0.9, help="(0.9)")
    r.add_argument("--adam-beta2", type=float, default=0.95, help="(0.95)")
    r.add_argument("--adam-eps", type=float, default=1e-8, help="(1e-8)")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="parameter/compute precision; main weights stay fp32 (bf16 on GPU, "
                        "fp32 on CPU where bf16 is ~20x slower)")
    r.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                   help="activation recompute (none)")
    r.add_argument("--seed", type=int, default=1234, help="random seed (1234)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="blend YAML (see `megatron-llama preprocess`)")
    d.add_argument("--tokenizer", default=None, help="SentencePiece model of the data")
    d.add_argument("--synthetic", action="store_true", help="random tokens (benchmarking)")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save", default=None, help="checkpoint directory (dist_checkpointing)")
    c.add_argument("--save-interval", type=int, default=0,
                   help="save every N steps (0: at the end and on SIGTERM/SIGUSR1 only)")
    c.add_argument("--load", default=None,
                   help="resume from the latest checkpoint here (default: --save, if it has one)")
    lg = p.add_argument_group("evaluation and logging")
    lg.add_argument("--eval-interval", type=int, default=0, help="validate every N steps (0: never)")
    lg.add_argument("--eval-iters", type=int, default=4, help="validation global batches (4)")
    lg.add_argument("--log-interval", type=int, default=1, help="log every N steps (1)")
    lg.add_argument("--log-file", default=None, help="JSONL log (default <save>/log.jsonl)")
    lg.add_argument("--wandb-project", default=None,
                    help="log to wandb (offline unless WANDB_API_KEY is set)")
    lg.add_argument("--wandb-run", default=None, help="wandb run name")
    lg.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s per device for MFU (default: known GPU, or CPU measured)")
    lg.add_argument("--on-nan", choices=("skip", "stop"), default="skip",
                    help="a non-finite loss skips the update (default) or stops the run")
    lg.add_argument("--exit-after-steps", type=int, default=None,
                    help="save and exit after this many steps of this process")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    import torch

    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS if getattr(args, k) is not None}
    if args.tokenizer and "vocab_size" not in overrides:
        from megatron_llama.data.tokenizer import Tokenizer

        overrides["vocab_size"] = Tokenizer(args.tokenizer).vocab_size
    model = preset.model.replace(**overrides)
    seq = args.seq_length or model.max_seq_len
    global_batch = args.global_batch or max(1, preset.batch_tokens // seq)
    steps = args.train_steps or max(1, preset.train_tokens // (global_batch * seq))
    return TrainConfig(
        model=model, layout=ParallelLayout(tp=args.tp, pp=args.pp, vp=args.vp, sp=args.sp),
        seq_length=seq, micro_batch=args.micro_batch, global_batch=global_batch,
        train_steps=steps, lr=args.lr or preset.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        dtype=args.dtype or ("bf16" if torch.cuda.is_available() else "fp32"),
        recompute=args.recompute, seed=args.seed,
        data_blend=None if args.synthetic else args.data, tokenizer=args.tokenizer,
        save_dir=args.save, save_interval=args.save_interval, load_dir=args.load or args.save,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        log_interval=args.log_interval, log_file=args.log_file,
        wandb_project=args.wandb_project, wandb_run=args.wandb_run,
        peak_tflops=args.peak_tflops, nan_policy=args.on_nan,
        exit_after_steps=args.exit_after_steps, engine=args.engine, zero_stage=args.zero_stage,
        offload_optimizer=args.offload_optimizer, deepspeed_config=args.deepspeed_config)
