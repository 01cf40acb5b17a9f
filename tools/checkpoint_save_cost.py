"""What a checkpoint save costs the training loop: synchronous vs asynchronous saving.

    python tools/checkpoint_save_cost.py                       # dim 512, 8 layers, 2 ranks
    python tools/checkpoint_save_cost.py --dim 1024 --n-layers 8 --saves 4

Runs the same `megatron-llama pretrain` three times on local ranks (synthetic data, DP over
``--nproc`` processes): without saves, with a save every ``--interval`` steps, and the same
with ``--async-save``. Each run's log holds, per step, the step time and the seconds the loop
waited on checkpoints since the previous record (``save_s``: the synchronous save, or the
asynchronous one's hand-off to the writer processes, its completion polls and its commit).
The cost of one save is the run's extra training time over the run without saves, divided
by the number of saves, so it also counts the writers slowing the steps down while they
share the host's cores (on a GPU node the steps run on the GPUs and the writers on the
host CPU, so asynchronous saving hides more there than on a CPU-only host).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, save_dir: str, mode: str) -> list[dict]:
    steps = args.interval * args.saves + 1  # the saves at interval multiples all get a record after
    cmd = [sys.executable, "-m", "megatron_llama.cli", "pretrain", "--synthetic",
           "--nproc-per-node", str(args.nproc), "--dim", str(args.dim),
           "--n-layers", str(args.n_layers), "--n-heads", str(args.dim // 64),
           "--vocab-size", "1024", "--max-seq-len", str(args.seq), "--seq-length", str(args.seq),
           "--micro-batch", "1", "--global-batch", str(args.nproc), "--warmup-steps", "1",
           "--train-steps", str(steps), "--log-file", os.path.join(save_dir, f"{mode}.jsonl"),
           "--hang-timeout", "0"]
    if mode != "none":
        cmd += ["--save", os.path.join(save_dir, mode), "--save-interval", str(args.interval)]
    if mode == "async":
        cmd.append("--async-save")
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONWARNINGS="ignore"))
    with open(os.path.join(save_dir, f"{mode}.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    # the final save (after the last record) is not counted; neither is the warm-up step
    return [r for r in records if "loss" in r and r["step"] > 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--interval", type=int, default=10, help="steps between saves")
    p.add_argument("--saves", type=int, default=3, help="saves measured")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        runs = {mode: run(args, workdir, mode) for mode in ("none", "sync", "async")}
        first = os.path.join(workdir, "sync", f"iter_{args.interval:07d}")
        size = sum(os.path.getsize(os.path.join(base, f))
                   for base, _, files in os.walk(first) for f in files)
    wall = {m: sum(r["step_time"] + r.get("save_s", 0.0) for r in rs) for m, rs in runs.items()}
    step = statistics.median(r["step_time"] for r in runs["none"])
    print(f"model dim {args.dim}, {args.n_layers} layers, {args.nproc} ranks, median step "
          f"{step * 1e3:.0f} ms, checkpoint {size / 1e6:.0f} MB")
    for mode in ("sync", "async"):
        cost = (wall[mode] - wall["none"]) / args.saves
        waited = sum(r.get("save_s", 0.0) for r in runs[mode]) / args.saves
        print(f"{mode:>5}: {cost:6.2f} s of training time per save ({cost / step:5.1f} steps); "
              f"the loop waited {waited:6.2f} s per save")
    sync = (wall["sync"] - wall["none"]) / args.saves
    asyn = (wall["async"] - wall["none"]) / args.saves
    if asyn > 0:
        print(f"asynchronous saving costs {asyn / sync:.2f}x the synchronous save's time")


if __name__ == "__main__":
    main()
