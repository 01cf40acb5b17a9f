"""`megatron-llama sbatch`: check, render and write the SLURM batch script (`launch.slurm`)."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_llama.errors import ConfigError
from megatron_llama.fileio import write_text
from megatron_llama.launch.slurm import Cluster, render_script


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_sbatch(args: argparse.Namespace) -> int:
    """Check, render and write the batch script; print the layout and how to submit it."""
    absolute = lambda p: os.path.abspath(p) if p else p  # noqa: E731 - the job's cwd may differ
    extra = list(args.pretrain_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      tasks_per_node=args.tasks_per_node, partition=args.partition,
                      account=args.account, qos=args.qos, time=args.time,
                      container=args.container, container_mounts=args.container_mounts,
                      venv=absolute(args.venv), run_root=absolute(args.run_root),
                      job_name=args.job_name, env=tuple(args.env or ()))
    overrides = dict(TP=args.tp, PP=args.pp, VP=args.vp, SP=args.sp, MICRO_BATCH=args.micro_batch,
                     GLOBAL_BATCH=args.global_batch, SEQ_LENGTH=args.seq_length,
                     RECOMPUTE=args.recompute, SAVE_INTERVAL=args.save_interval,
                     EVAL_INTERVAL=args.eval_interval, SIGNAL_SECONDS=args.signal_seconds,
                     CP=args.cp, ENDS_AS_LAYERS=args.embedding_and_loss_as_layers)
    script, s = render_script(args.preset, cluster, overrides, data=absolute(args.data),
                              tokenizer=absolute(args.tokenizer), synthetic=args.synthetic,
                              checkpoint_dir=absolute(args.checkpoint_dir),
                              train_steps=args.train_steps, max_retries=args.max_retries,
                              extra_args=extra)
    output = args.output or f"{cluster.job_name or 'llama-' + s['preset']}.sbatch"
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.exists(output) and not args.force:
        raise ConfigError(f"{output}: already exists (pass --force to replace it)")
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: no such directory for --output (create it first)")
    for flag, path in (("--data", args.data), ("--tokenizer", args.tokenizer)):
        if path and not os.path.exists(path):
            print(f"warning: {flag} {absolute(path)} does not exist on this machine; it must "
                  "exist on the cluster's nodes when the job runs", file=sys.stderr)
    write_text(output, script, executable=True)
    if not os.path.isdir(cluster.run_root):
        os.makedirs(cluster.run_root)  # sbatch does not create the folder of its --output
        print(f"created {cluster.run_root} (job logs and per-job folders)")
    vp = f" VP={s['vp']}" if s["vp"] else ""
    cp = f" CP={s['cp']}" if s["cp"] != "1" else ""
    ends = " (embedding and loss as layers)" if s["ends_as_layers"] == "1" else ""
    print(f"wrote {output}: {s['preset']} on {cluster.nodes} nodes x {cluster.ntasks_per_node} "
          f"tasks = {s['world_size']}, TP={s['tp']}{' (SP)' if s['sp'] == '1' else ''}{cp} "
          f"PP={s['pp']}{vp}{ends} DP={s['dp']}, micro batch {s['micro_batch']} x "
          f"{s['microbatches']} microbatches = global {s['global_batch']}, "
          f"{s['train_steps']:,} steps")
    print(f"submit with: sbatch {output}")
    return 0


def add_command(subparsers) -> None:
    """Add `megatron-llama sbatch` to the CLI's subparsers."""
    p = subparsers.add_parser(
        "sbatch", help="render a SLURM batch script for a preset on a cluster (checked first)",
        description="Write a batch script that pretrains PRESET on a SLURM cluster: one srun "
        "task per GPU, MASTER_ADDR from the job's first host, NCCL settings, per-job log and "
        "checkpoint folders, SIGUSR1 before the time limit -> checkpoint -> `scontrol "
        "requeue` -> automatic resume. The layout (the preset's settings file plus the "
        "overrides below) is checked before anything is written: TP x PP x DP = world size, "
        "heads divisible by TP, batches divisible; impossible runs are refused with one line.",
        epilog="example (2048 GPUs): megatron-llama sbatch --preset 65B --nodes 256 "
        "--gpus-per-node 8 --partition gpu --account proj --time 2-00:00:00 --container "
        "nvcr.io/nvidia/pytorch:24.05-py3 --data mix.yaml --tokenizer tok.model --run-root "
        "/scratch/llama --output llama-65B.sbatch && sbatch llama-65B.sbatch. Extra pretrain "
        "flags go after `--`.")
    c = p.add_argument_group("cluster")
    c.add_argument("--preset", required=True,
                   help="a preset with a settings file (7B, 13B, 33B, 65B, llama2-70b, "
                        "llama3-70b, llama3.1-405b) or any other preset (plain defaults)")
    c.add_argument("--nodes", type=int, required=True, help="number of nodes")
    c.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one task each (8); 0 = CPU nodes (gloo)")
    c.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: one per GPU; 1 on CPU nodes)")
    c.add_argument("--partition", default=None, help="SLURM partition (cluster default)")
    c.add_argument("--account", default=None, help="SLURM account to charge (user default)")
    c.add_argument("--qos", default=None, help="SLURM quality of service (default)")
    c.add_argument("--time", default="24:00:00",
                   help="time limit per run of the job, e.g. 2-00:00:00 (24:00:00); the job "
                        "checkpoints and requeues itself before it")
    c.add_argument("--job-name", default=None, help="job name (llama-<preset>)")
    c.add_argument("--container", default=None,
                   help="container image for pyxis/enroot (srun --container-image)")
    c.add_argument("--container-mounts", default=None,
                   help="pyxis mounts SRC:DST[,...] (default: the run root)")
    c.add_argument("--venv", default=None, help="virtualenv to activate before srun")
    c.add_argument("--run-root", default="runs",
                   help="folder for per-job folders <job name>-<job id>/ and job output (runs)")
    c.add_argument("--checkpoint-dir", default=None,
                   help="checkpoints here instead of the job's own folder (to continue "
                        "another job's run)")
    c.add_argument("--env", action="append", type=_env_pair, metavar="KEY=VALUE",
                   help="export in the script, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    c.add_argument("--signal-seconds", type=int, default=None,
                   help="SIGUSR1 this many seconds before the time limit (preset's)")
    c.add_argument("--max-retries", type=int, default=3,
                   help="requeue a failed run (a crash, a hang, a lost node) up to this many "
                        "times in a row at one checkpoint step; 0 never (3)")
    c.add_argument("--output", default=None, help="script to write (<job name>.sbatch)")
    c.add_argument("--force", action="store_true", help="replace an existing --output")
    lay = p.add_argument_group("layout and recipe (default: the preset's settings file)")
    lay.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    lay.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    lay.add_argument("--vp", type=int, default=None,
                     help="virtual pipeline stages per rank (0 or 1: none)")
    lay.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                     help="sequence parallelism on/off (--no-sp)")
    lay.add_argument("--cp", type=int, default=None,
                     help="context-parallel size (GPUs with Transformer Engine; long context)")
    lay.add_argument("--embedding-and-loss-as-layers", action=argparse.BooleanOptionalAction,
                     default=None, help="count the embedding and the loss as a layer each "
                                        "when splitting layers over pipeline stages")
    lay.add_argument("--micro-batch", type=int, default=None, help="sequences per microbatch")
    lay.add_argument("--global-batch", type=int, default=None, help="sequences per step")
    lay.add_argument("--seq-length", type=int, default=None, help="tokens per sequence")
    lay.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                     help="activation recompute")
    lay.add_argument("--train-steps", type=int, default=None,
                     help="optimizer steps (default: the preset's tokens / tokens per step)")
    lay.add_argument("--save-interval", type=int, default=None, help="checkpoint every N steps")
    lay.add_argument("--eval-interval", type=int, default=None,
                     help="validate every N steps (0: never)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="blend YAML (see `megatron-llama preprocess`)")
    d.add_argument("--tokenizer", default=None, help="SentencePiece model of the data")
    d.add_argument("--synthetic", action="store_true", help="random tokens (smoke tests)")
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER, metavar="-- PRETRAIN FLAGS",
                   help="further `pretrain` flags (e.g. -- --wandb-project x --peak-tflops 989)")
    p.set_defaults(func=cmd_sbatch)
