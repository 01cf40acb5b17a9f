"""Fault tolerance with real processes on gloo: no orphans, one writer per --save, signals to
the launcher, hang detection, every step logged once after crashes, damaged data refused."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_llama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--vocab-size", "128",
         "--multiple-of", "16", "--max-seq-len", "32", "--micro-batch", "1", "--global-batch",
         "2", "--warmup-steps", "1"]
TINY = ["pretrain", "--synthetic", "--nproc-per-node", "2", *MODEL]
ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_llama.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(ENV, **(env or {})))


def run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_llama.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(ENV, **(env or {})))


def logged_steps(save) -> list[int]:
    log = save / "log.jsonl"
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def wait_for_steps(proc, save, n: int, timeout: float = 300) -> int:
    """Wait until the log of ``save`` holds step ``n`` or later; returns the last step."""
    deadline = time.monotonic() + timeout
    while True:
        steps = logged_steps(save)
        if steps and steps[-1] >= n:
            return steps[-1]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not get there"
        time.sleep(0.1)


def process_tree(proc) -> list:
    import psutil

    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def assert_all_gone(procs, timeout: float) -> None:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:  # clean up before failing
        p.kill()
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def latest(save) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


# ---- one writer per --save --------------------------------------------------------------------
def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    from megatron_llama.resilience.lock import LOCK_FILE, RunLock

    held = RunLock(str(tmp_path))
    assert held.acquire() is None
    with pytest.raises(ConfigError, match=rf"another run writes checkpoints here \(host "
                                          rf"{socket.gethostname()}, pid {os.getpid()}, "
                                          r"started .*; its lock is held\); stop it"):
        RunLock(str(tmp_path)).acquire()
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()

    # a run on this host that is gone (its pid has ended): taken over at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                                  "start": time.time() - 5, "token": "x"}))
    lock = RunLock(str(tmp_path))
    assert lock.acquire().startswith(f"took over the lock of a run that is gone (host "
                                     f"{socket.gethostname()}, pid {pid}, started ")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()

    # a run on another host (flock may not reach across hosts): its heartbeat decides
    other = {"host": "node-0042", "pid": 1234, "start": time.time() - 60, "token": "y"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"host node-0042, pid 1234, .*its heartbeat is \d+ s "
                                          "old"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    lock = RunLock(str(tmp_path))
    assert "took over the lock of a run that is gone (host node-0042" in lock.acquire()
    lock.release()


# ---- .bin / .idx checked before any rank builds a dataset -----------------------------------
def test_damaged_dataset_pairs_are_refused_naming_the_file(tmp_path):
    from megatron_llama.data.indexed import IndexedDatasetWriter, check_pair

    def dataset(name, docs):
        prefix = str(tmp_path / name)
        with IndexedDatasetWriter(prefix) as w:
            for d in docs:
                w.add_document(d)
            w.finalize()
        return prefix

    good = dataset("good", [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    other = dataset("other", [[1, 2, 3, 4, 5, 6, 7]])
    assert check_pair(good) == 3
    data = open(good + ".bin", "rb").read()
    open(good + ".bin", "wb").write(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r"good\.bin: 9 bytes, but .*good\.idx indexes 18 bytes "
                                         r"of uint16 tokens \(truncated"):
        check_pair(good)
    os.replace(other + ".bin", good + ".bin")  # another dataset's tokens
    with pytest.raises(ValueError, match=r"good\.bin: 14 bytes, .*indexes 18 bytes"):
        check_pair(good)
    idx = open(good + ".idx", "rb").read()
    open(good + ".idx", "wb").write(idx[:-5])
    with pytest.raises(ValueError, match=r"good\.idx: \d+ bytes, but its header \(3 sequences, 3 "
                                         "documents\) implies"):
        check_pair(good)
    # through `pretrain`: one line before any rank starts
    result = run("pretrain", "--data", good, "--nproc-per-node", "2", "--vocab-size", "128",
                 "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--max-seq-len", "32")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "good.idx: " in result.stderr, result.stderr


# ---- launcher and ranks dying ---------------------------------------------------------------
@pytest.mark.multiprocess
def test_no_orphans_one_writer_and_each_step_logged_once(tmp_path):
    save = tmp_path / "run"
    args = [*TINY, "--train-steps", "100000", "--save", str(save), "--save-interval", "5"]
    first = start(*args)
    try:
        wait_for_steps(first, save, 3)
        # a second run on the same --save is refused, naming the live holder (rank 0)
        holder = json.loads((save / ".megatron-llama.lock").read_text())
        second = run(*args, timeout=120)
        assert second.returncode == 2
        assert second.stderr.splitlines() == [
            f"megatron-llama pretrain: error: {save}: another run writes checkpoints here (host "
            f"{socket.gethostname()}, pid {holder['pid']}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['start']))}; its lock "
            "is held); stop it or choose another --save"]
        assert holder["pid"] in [p.pid for p in process_tree(first)]
        # SIGKILL of the launcher (the OOM killer, a lost srun step): the ranks save and end
        tree = process_tree(first)
        first.kill()
        assert_all_gone(tree, timeout=60)
        step = latest(save)
        assert step >= 3 and not (save / ".megatron-llama.lock").exists()
    finally:
        if first.poll() is None:
            first.kill()

    # SIGKILL of one rank: the other is stopped, one line names the rank
    resumed = start(*args)
    wait_for_steps(resumed, save, step + 2)
    tree = process_tree(resumed)
    ranks = [p for p in tree[1:] if "megatron_llama.cli" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].kill()
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 137, err
    assert err.rstrip().endswith("error: rank 1 was killed by SIGKILL (out of memory?)"), err
    assert_all_gone(tree, timeout=30)

    # kill -9 of every process mid-run (a node lost): the lock is stale, the log has extra steps
    again = start(*args)
    wait_for_steps(again, save, latest(save) + 7)  # past the next save (every 5 steps)
    tree = process_tree(again)
    for p in tree:
        p.kill()
    assert_all_gone(tree, timeout=30)
    crashed_at, resume_from = logged_steps(save)[-1], latest(save)
    assert crashed_at > resume_from  # steps after the checkpoint were logged before the crash
    final = crashed_at + 3
    done = run(*[a if a != "100000" else str(final) for a in args], timeout=300)
    assert done.returncode == 0, done.stderr
    assert "took over the lock of a run that is gone" in done.stderr
    assert f"log: dropped {crashed_at - resume_from} record(s) past step {resume_from}" in done.stdout
    assert logged_steps(save) == list(range(1, final + 1))  # every step exactly once


@pytest.mark.multiprocess
def test_sigterm_and_sigusr1_to_the_launcher_save_and_resume_bitwise(tmp_path):
    """The signals Slurm and users send to the process they started: each makes every rank
    save after its step; the launcher exits 0 and nothing is left; the resumed run gives
    the uninterrupted run's losses bit for bit. The interrupted runs save asynchronously
    every 5 steps and keep the last 2 checkpoints; the reference does not save."""
    common = [*TINY, "--train-steps", "100000"]
    save = tmp_path / "run"
    interrupted = [*common, "--async-save", "--save-interval", "5", "--keep-last", "2",
                   "--save", str(save)]
    stops = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        proc = start(*interrupted)
        wait_for_steps(proc, save, (stops[-1] if stops else 0) + 8)
        tree = process_tree(proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (sig, err)
        lines = [line for line in out.splitlines() if line.startswith("stopped by a signal")]
        assert len(lines) == 1, out
        stops.append(latest(save))
        assert f"after step {stops[-1]};" in lines[0]
        assert_all_gone(tree, timeout=30)
    assert 8 <= stops[0] < stops[1]
    saved = sorted(int(p.name[5:]) for p in save.iterdir() if p.name.startswith("iter_"))
    assert len(saved) == 2 and saved[-1] == stops[1]  # --keep-last 2
    reference = run(*common, "--exit-after-steps", str(stops[1]),
                    "--log-file", str(tmp_path / "ref.jsonl"), timeout=600)
    assert reference.returncode == 0, reference.stderr

    def losses(log):
        return {r["step"]: r["loss"] for r in map(json.loads, log.open()) if "loss" in r}

    # JSON floats: bitwise equal, across two asynchronous checkpoints and two resumes
    assert losses(save / "log.jsonl") == losses(tmp_path / "ref.jsonl")
    assert sorted(losses(save / "log.jsonl")) == list(range(1, stops[1] + 1))


@pytest.mark.multiprocess
def test_ranks_under_torchrun_end_when_torchrun_is_killed(tmp_path):
    """torchrun starts its workers in their own sessions and does not take them along when
    it is SIGKILLed: each rank's watchdog sees itself re-parented and saves and stops."""
    from megatron_llama.local_ranks import free_port

    save = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         "-m", "megatron_llama.cli", "pretrain", "--synthetic", *MODEL,
         "--train-steps", "100000", "--save", str(save)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_steps(proc, save, 3)
        tree = process_tree(proc)
        assert len([p for p in tree if "megatron_llama.cli" in " ".join(p.cmdline())]) >= 2
        proc.kill()
        assert_all_gone(tree, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest(save) >= 3  # the ranks saved on their way out
    assert not (save / ".megatron-llama.lock").exists()


# ---- hangs ------------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_a_hang_prints_every_ranks_stacks_and_exits_nonzero(tmp_path):
    start_time = time.monotonic()
    proc = start(*TINY, "--train-steps", "100000", "--hang-timeout", "5",
                 env={"MEGATRON_LLAMA_TEST_HANG_AT": "3:1"})  # rank 1 stops in step 3
    tree = process_tree(proc)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 124, err
    for rank in (0, 1):
        assert re.search(rf"megatron-llama pretrain: error: rank {rank} made no progress for \d+ "
                         r"s after step 2, in step 3 \(limit 5 s, --hang-timeout\)", err), err
    assert "in injected_hang" in err  # rank 1's stack shows where it stopped
    assert "in finish_grad_sync" in err or "in _agree" in err  # rank 0 waits for it
    assert err.rstrip().endswith("error: rank 1 hung (no progress within --hang-timeout; the "
                                 "stacks of the stuck ranks are above)") or err.rstrip().endswith(
        "error: rank 0 hung (no progress within --hang-timeout; the stacks of the stuck ranks "
        "are above)"), err
    assert_all_gone(tree, timeout=30)
    assert time.monotonic() - start_time < 240


# ---- a full disk --------------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_a_full_disk_fails_the_save_in_one_line_and_the_previous_checkpoint_resumes(tmp_path):
    """A real 3 MB tmpfs where this machine lets us mount one (root in CI), else an injected
    ENOSPC on rank 1: the step-3 checkpoint (2 MB) fits, the step-6 one does not."""
    import shutil

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)],
                             capture_output=True).returncode == 0
    env = {} if mounted else {"MEGATRON_LLAMA_TEST_ENOSPC_AT": "6:1"}
    save = small / "run"
    try:
        args = [*TINY, "--train-steps", "9", "--save-interval", "3"]
        result = run(*args, "--save", str(save), env=env)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        # each rank's writer fails its own way (ENOSPC, or torch's zip writer cut short):
        # the line gives the errno where a rank saw one, and the free space
        assert re.fullmatch(
            f"megatron-llama pretrain: error: {re.escape(str(save))}: cannot save the "
            r"checkpoint of step 6: .+; its partial files are removed and the latest "
            "checkpoint is still step 3, which the same command resumes from", lines[0]), lines
        assert "No space left on device (errno 28)" in lines[0] or " GB free of " in lines[0]
        assert sorted(p.name for p in save.iterdir()) == [
            "iter_0000003", "latest_checkpointed_iteration.txt", "log.jsonl"]  # no debris
        moved = tmp_path / "moved"  # somewhere with space: it resumes from step 3
        shutil.copytree(save, moved)
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=True)
    done = run(*args, "--save", str(moved))
    assert done.returncode == 0, done.stderr
    assert "starting at step 4" in done.stdout
    assert logged_steps(moved) == list(range(1, 10))
