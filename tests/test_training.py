"""Pretraining on 2 gloo processes: exact resume after SIGKILL, resume into another layout,
signal-triggered checkpoints, non-finite losses. Real megatron-core, real dist_checkpointing."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_llama import checkpoint_files as checkpoint
from megatron_llama.local_ranks import LaunchError, run_processes
from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout
from megatron_llama.training.loop import NAN_TEST_ENV, SIGKILL_TEST_ENV
from megatron_llama.training.recipe import TrainConfig

MODEL = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256,
                    multiple_of=16, max_seq_len=32)
N = 3  # checkpoint (and kill) after step N of 2N


def tiny_run(save_dir: str, layout: ParallelLayout = ParallelLayout(tp=2), **kw) -> TrainConfig:
    defaults = dict(model=MODEL, layout=layout, seq_length=32, micro_batch=2, global_batch=8,
                    train_steps=2 * N, lr=3e-3, warmup_steps=2, dtype="fp32",
                    save_dir=save_dir, save_interval=N, log_interval=1, seed=7)
    defaults.update(kw)
    return TrainConfig(**defaults)


def first_worker(rank, world, workdir):
    """An uninterrupted 2N-step run, then the non-finite-loss policies (DP=2)."""
    from megatron_llama.training.loop import NonFiniteLoss, pretrain

    out = {"full": pretrain(tiny_run(os.path.join(workdir, "full")))["losses"]}
    # DP=2: the distributed optimizer shards its state over 2 ranks (TP=2 above has DP=1).
    out["dp2"] = pretrain(tiny_run(os.path.join(workdir, "dp2"), ParallelLayout()))["losses"]
    os.environ[NAN_TEST_ENV] = "2"
    skip = pretrain(tiny_run(os.path.join(workdir, "nan"), ParallelLayout(), train_steps=4))
    out["skip"] = {"losses": skip["losses"], "skipped": skip["skipped"]}
    try:
        pretrain(tiny_run(os.path.join(workdir, "nanstop"), ParallelLayout(), nan_policy="stop"))
        out["stop"] = "did not stop"
    except NonFiniteLoss as e:
        out["stop"] = str(e)
    os.environ.pop(NAN_TEST_ENV)
    return out


def killed_worker(rank, world, workdir):
    from megatron_llama.training.loop import pretrain

    os.environ[SIGKILL_TEST_ENV] = str(N + 1)  # one step logged past the step-N checkpoint
    pretrain(tiny_run(os.path.join(workdir, "killed")))
    return "not killed"


def resume_worker(rank, world, workdir):
    from megatron_llama.training.loop import pretrain

    same = pretrain(tiny_run(os.path.join(workdir, "killed"),
                             load_dir=os.path.join(workdir, "killed")))["losses"]
    other = pretrain(tiny_run(os.path.join(workdir, "relayout"), ParallelLayout(pp=2),
                              load_dir=os.path.join(workdir, "relayout")))["losses"]
    # the latest checkpoint of the uninterrupted run, one byte flipped: back to step N
    flipped = pretrain(tiny_run(os.path.join(workdir, "flipped"), keep_last=1,
                                load_dir=os.path.join(workdir, "flipped")))["losses"]
    return {"same": same, "other": other, "flipped": flipped}


def flip_one_byte(folder: str) -> str:
    """Flip a byte in the middle of the folder's largest tensor file; returns its path."""
    path = max((os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".distcp")),
               key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("train"))
    first = run_processes(first_worker, 2, workdir, timeout=600)
    with pytest.raises(LaunchError, match="exited abnormally"):
        run_processes(killed_worker, 2, workdir, timeout=600)
    killed = os.path.join(workdir, "killed")
    assert checkpoint.latest_iteration(killed) == N
    # Another layout starts from a copy of the same step-N checkpoint.
    relayout = os.path.join(workdir, "relayout")
    shutil.copytree(killed, relayout)
    flipped = os.path.join(workdir, "flipped")
    shutil.copytree(os.path.join(workdir, "full"), flipped)
    damaged = flip_one_byte(os.path.join(flipped, f"iter_{2 * N:07d}"))
    resumed = run_processes(resume_worker, 2, workdir, timeout=600)
    return first, resumed, workdir, damaged


@pytest.mark.multiprocess
def test_sigkill_then_resume_is_bitwise_identical(runs):
    first, resumed, workdir, _ = runs
    full = first[0]["full"]
    assert sorted(full) == list(range(1, 2 * N + 1))
    same = resumed[0]["same"]
    assert sorted(same) == list(range(N + 1, 2 * N + 1))
    for step in same:
        assert same[step] == full[step], (step, same[step], full[step])  # bitwise
    # step N + 1 was logged before the crash and again after the resume: the log holds it once
    log = os.path.join(workdir, "killed", "log.jsonl")
    steps = [json.loads(line)["step"] for line in open(log) if "loss" in json.loads(line)]
    assert steps == list(range(1, 2 * N + 1))


@pytest.mark.multiprocess
def test_damaged_checkpoint_refused_and_previous_one_resumed(runs):
    from megatron_llama.convert.run import convert
    from megatron_llama.errors import ConfigError

    first, resumed, workdir, damaged = runs
    full, flipped = first[0]["full"], resumed[0]["flipped"]
    # iter 2N failed verification: the run went back to step N and repeated N+1..2N exactly
    assert sorted(flipped) == list(range(N + 1, 2 * N + 1))
    for step in flipped:
        assert flipped[step] == full[step], (step, flipped[step], full[step])  # bitwise
    # --keep-last 1: the new step-2N checkpoint replaced the damaged one, then step N went
    assert sorted(p for p in os.listdir(os.path.join(workdir, "flipped"))
                  if p.startswith("iter_")) == [f"iter_{2 * N:07d}"]
    meta = json.load(open(os.path.join(workdir, "full", f"iter_{2 * N:07d}", checkpoint.METADATA)))
    files = sorted(f for f in os.listdir(os.path.dirname(damaged)) if f != checkpoint.METADATA)
    assert sorted(meta["files"]) == files and all(len(v["crc32"]) == 8
                                                   for v in meta["files"].values())
    # convert refuses a damaged latest checkpoint with one line naming the file
    bad = os.path.join(workdir, "bad")
    shutil.copytree(os.path.join(workdir, "full"), bad)
    flip_one_byte(os.path.join(bad, f"iter_{2 * N:07d}"))
    with pytest.raises(ConfigError, match=r"iter_0000006/__\d+_\d+\.distcp: checksum differs "
                                          r"from the one recorded at save \(damaged\); refusing"):
        convert(bad, os.path.join(workdir, "bad-meta"), "meta", progress=False)
    assert not os.path.exists(os.path.join(workdir, "bad-meta"))


@pytest.mark.multiprocess
def test_resume_into_another_layout(runs):
    first, resumed, workdir, _ = runs
    full, other = first[0]["full"], resumed[0]["other"]
    assert sorted(other) == list(range(N + 1, 2 * N + 1))
    for step in other:  # TP=2 checkpoint continued at PP=2: same numbers up to rounding
        assert abs(other[step] - full[step]) <= 1e-5 * abs(full[step]), (step, other, full)
    meta = json.load(open(os.path.join(workdir, "relayout", f"iter_{2 * N:07d}",
                                       checkpoint.METADATA)))
    assert meta["layout"] == {"tp": 1, "pp": 2, "vp": None}


@pytest.mark.multiprocess
def test_data_parallel_distributed_optimizer_matches_tensor_parallel(runs):
    first, _, _, _ = runs
    full, dp2 = first[0]["full"], first[0]["dp2"]
    assert sorted(dp2) == sorted(full)
    for step in full:  # 6 AdamW steps with sharded optimizer state vs unsharded
        assert abs(dp2[step] - full[step]) <= 1e-5 * abs(full[step]), (step, dp2, full)


@pytest.mark.multiprocess
def test_nonfinite_loss_skipped_or_stopped(runs):
    first, _, _, _ = runs
    skip = first[0]["skip"]
    assert skip["skipped"] == 1 and math.isnan(skip["losses"][2])
    assert all(math.isfinite(skip["losses"][s]) for s in (1, 3, 4))
    assert first[0]["stop"].startswith("step 2: loss is nan; stopping")


@pytest.mark.parametrize("engine", [[], ["--engine", "deepspeed", "--zero-stage", "2"]],
                         ids=["megatron", "deepspeed-tp2"])
@pytest.mark.multiprocess
def test_checkpoint_on_sigusr1_and_clean_exit(tmp_path, engine):
    import psutil

    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "megatron_llama.cli", "pretrain", "--synthetic", *engine,
           "--nproc-per-node", "2", "--tp", "2", "--dim", "64", "--n-layers", "2",
           "--n-heads", "4", "--vocab-size", "256", "--max-seq-len", "32",
           "--global-batch", "4", "--train-steps", "100000", "--warmup-steps", "10",
           "--save", str(save), "--log-interval", "1", "--save-interval", "1"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        log = save / "log.jsonl"
        while time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 2:
                break
            assert launcher.poll() is None, launcher.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("training did not start")
        def cmdline(p) -> str:  # a helper process may have just exited (zombie, gone)
            try:
                return " ".join(p.cmdline())
            except psutil.Error:
                return ""

        found = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "megatron_llama.cli" in cmdline(p)
                 and "torch.distributed.run" not in cmdline(p)]
        # the ranks, not processes they forked (a checkpoint writer has their command line)
        pids = {p.pid for p in found}
        workers = [p for p in found if p.ppid() not in pids]
        assert len(workers) == 2
        # As Slurm does with --signal=USR1@T: every process of the step gets it, also the
        # helper processes dist_checkpointing started at the earlier saves.
        for p in workers + [c for w in workers for c in w.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a writer may just have ended
                p.send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "stopped by a signal after step" in output
    if engine:  # DeepSpeed names its latest checkpoint in "latest"
        step = int((save / "latest").read_text().strip()[len("iter_"):])
    else:
        step = checkpoint.latest_iteration(str(save))
    assert step is not None and 2 <= step < 100000
    assert not any(p.name.endswith(".tmp") for p in save.iterdir())


@pytest.mark.slow
def test_log_records_wandb_and_plot(megatron_single, tmp_path):
    """One process, bf16: every logged field, validation, wandb offline run, PNG curves."""
    from megatron_llama.training.loop import pretrain
    from megatron_llama.training.plot import plot_log

    cfg = tiny_run(str(tmp_path / "run"), ParallelLayout(), train_steps=4, eval_interval=2,
                   eval_iters=1, dtype="bf16", wandb_project="megatron-llama-test",
                   wandb_run="tiny")
    os.environ["WANDB_MODE"] = "offline"
    summary = pretrain(cfg)
    assert summary["status"] == "finished" and summary["iteration"] == 4
    records = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("lr", "grad_norm", "skipped", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu",
                "memory_gb", "consumed_samples", "step_time"):
        assert all(r[key] is not None for r in train), key
    assert [r["consumed_samples"] for r in train] == [8, 16, 24, 32]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert val[0]["val_ppl"] == pytest.approx(math.exp(val[0]["val_loss"]))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    png = plot_log(str(tmp_path / "run" / "log.jsonl"), str(tmp_path / "curves.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiprocess
def test_checkpoint_of_another_model_refused(runs, megatron_single, tmp_path):
    from megatron_llama.errors import ConfigError
    from megatron_llama.training.loop import pretrain

    _, _, workdir, _ = runs
    other = tiny_run(str(tmp_path / "other"), ParallelLayout(), model=MODEL.replace(dim=128),
                     load_dir=os.path.join(workdir, "full"))
    with pytest.raises(ConfigError, match="checkpoint is of a different model .dim differ") as e:
        pretrain(other)
    assert "\n" not in str(e.value)
