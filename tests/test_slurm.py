"""`megatron-llama sbatch`: the rendered script for every paper preset on 2048 GPUs, refusal
of impossible layouts with one line, and a real Slurm (Debian's slurmctld + 2 slurmd +
munge, started here) running a rendered script: it trains, checkpoints, gets the time-limit
signal, requeues itself and resumes from its checkpoint to the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_llama import cli
from megatron_llama.launch import slurm
from tests import slurm_testing

REPO = Path(__file__).resolve().parent.parent
DATA = ["--data", "/data/mix.yaml", "--tokenizer", "/data/tokenizer.model"]

# preset: TP, PP, VP, SP, DP, microbatches per step, train steps (tokens / 4M), signal lead
PAPER_LAYOUTS = {
    "7B": ("1", "1", "", "0", 2048, 1, 10**12 // 2**22, "180"),
    "13B": ("2", "1", "", "1", 1024, 2, 10**12 // 2**22, "240"),
    "33B": ("4", "2", "3", "1", 256, 8, 14 * 10**11 // 2**22, "420"),
    "65B": ("8", "4", "2", "1", 64, 32, 14 * 10**11 // 2**22, "600"),
}


def setting(script: str, key: str) -> str:
    """The value a rendered script assigns to KEY in its settings block."""
    match = re.search(rf"^{key}=(\S*)", script, re.M)
    assert match, f"{key} not set in the script"
    return match.group(1)


def sbatch(tmp_path, capsys, *argv):
    """Run `megatron-llama sbatch` in process; (exit code, stdout, stderr, script or None)."""
    out = tmp_path / "job.sbatch"
    code = cli.main(["sbatch", "--output", str(out), "--run-root", str(tmp_path / "runs"),
                     *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out.read_text() if out.exists() else None


@pytest.mark.parametrize("preset", list(PAPER_LAYOUTS))
def test_paper_presets_on_2048_gpus(preset, tmp_path, capsys):
    tp, pp, vp, sp, dp, micro, steps, lead = PAPER_LAYOUTS[preset]
    code, out, err, script = sbatch(tmp_path, capsys, "--preset", preset, "--nodes", "256",
                                    "--partition", "gpu", "--account", "llm", "--time",
                                    "2-00:00:00", "--venv", "/opt/venv", *DATA,
                                    "--env", "NCCL_SOCKET_IFNAME=ib0")
    assert code == 0, err
    vp_text = f" VP={vp}" if vp else ""
    assert (f"{preset} on 256 nodes x 8 tasks = 2048, TP={tp}{' (SP)' if sp == '1' else ''} "
            f"PP={pp}{vp_text} DP={dp}, micro batch 1 x {micro} microbatches = global 2048, "
            f"{steps:,} steps") in out
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [f"#SBATCH --job-name=llama-{preset}", "#SBATCH --nodes=256",
                      "#SBATCH --ntasks-per-node=8", "#SBATCH --time=2-00:00:00",
                      f"#SBATCH --signal=B:USR1@{lead}", "#SBATCH --requeue",
                      "#SBATCH --open-mode=append",
                      f"#SBATCH --output={tmp_path}/runs/%x-%j.out",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --mem=0",
                      "#SBATCH --partition=gpu", "#SBATCH --account=llm"]
    for key, value in dict(PRESET=preset, TP=tp, PP=pp, VP=vp, SP=sp, MICRO_BATCH="1",
                           GLOBAL_BATCH="2048", SEQ_LENGTH="2048", RECOMPUTE="selective",
                           TRAIN_STEPS=str(steps), SIGNAL_SECONDS=lead).items():
        assert setting(script, key) == value, key
    # every choice explained: the preset file's comments travel with the script
    assert f"# LLaMA-{preset} on 256 nodes x 8 GPUs of 80 GB" in script
    assert re.search(r"^TP=\S+ +# \w", script, re.M) and re.search(r"^PP=\S+ +# \w", script, re.M)
    assert "source /opt/venv/bin/activate" in script
    assert "ARGS+=(--data /data/mix.yaml --tokenizer /data/tokenizer.model)" in script
    assert "export NCCL_SOCKET_IFNAME=ib0" in script and "NCCL_IB_HCA" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "trap on_usr1 USR1" in script
    assert "{{" not in script and "}}" not in script
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    assert (tmp_path / "runs").is_dir()  # sbatch does not create its --output folder


def test_overrides_container_and_extra_flags(tmp_path, capsys):
    code, out, err, script = sbatch(
        tmp_path, capsys, "--preset", "65B", "--nodes", "128", "--pp", "2", "--vp", "4",
        "--container", "nvcr.io/nvidia/pytorch:24.05-py3", "--checkpoint-dir", "/ckpt/65b",
        "--synthetic", "--", "--wandb-project", "llama65b", "--peak-tflops", "989")
    assert code == 0, err
    assert "TP=8 (SP) PP=2 VP=4 DP=64" in out
    assert re.search(r"^PP=2  # overridden \(preset: 4\)$", script, re.M)
    assert re.search(r"^VP=4  # overridden \(preset: 2\)$", script, re.M)
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05-py3" in script
    assert "source " not in script
    assert setting(script, "CKPT_DIR") == "/ckpt/65b"
    assert "ARGS+=(--synthetic)" in script
    assert "ARGS+=(--wandb-project llama65b --peak-tflops 989)" in script


REFUSALS = [
    (["--preset", "33B", "--tp", "8"], "n_heads=52 is not divisible by TP=8 (legal TP: 1, 2, 4)"),
    (["--preset", "65B", "--nodes", "3"], "world size 24 is not divisible by TP*PP=32"),
    (["--preset", "65B", "--micro-batch", "3"],
     "global batch 2048 is not divisible by micro batch 3 x DP 64"),
    (["--preset", "65B", "--global-batch", "192"],
     "interleaved pipeline needs the number of microbatches (3) to be a multiple of PP=4"),
    (["--preset", "65B", "--vp", "3"], "n_layers=80 is not divisible by PP*VP=12 (uneven stages: "
     "--embedding-and-loss-as-layers or --first-stage-layers / --last-stage-layers)"),
    (["--preset", "65B", "--gpus-per-node", "4"],
     "TP=8 does not fit the 4 tasks of a node: tensor parallelism must stay inside a node"),
    (["--preset", "7B", "--sp"], "sequence parallelism needs TP > 1"),
    (["--preset", "7B", "--seq-length", "4096"],
     "seq_length 4096 exceeds the model's max_seq_len 2048"),
    (["--preset", "65B", "--time", "5"],
     "signal lead time 600 s is not shorter than the time limit 5 (300 s)"),
    (["--preset", "65B", "--time", "1h"],
     "time limit '1h' is not M, M:S, H:M:S, D-H, D-H:M or D-H:M:S"),
    (["--preset", "65B", "--venv", "/v", "--container", "img"],
     "choose a container or a virtualenv, not both"),
    (["--preset", "65B", "--gpus-per-node", "8", "--tasks-per-node", "4"],
     "one task per GPU: tasks per node (4) must equal GPUs per node (8)"),
    (["--preset", "65B", "--partition", "gpu a100"],
     "partition 'gpu a100' has characters a #SBATCH line or path cannot hold (spaces, quotes, ...)"),
    (["--preset", "65B", "--", "--tp", "4"],
     "--tp is set by the script itself: use the sbatch flag of that name"),
    (["--preset", "70B"], "unknown preset '70B' (did you mean llama2-70b or llama3-70b or "
     "llama3.1-70b?); choose from tiny, 7B, 13B, 33B, 65B, llama2-7b, llama2-13b, llama2-70b, "
     "codellama-7b, llama3-8b, llama3-70b, llama3.1-8b, llama3.1-70b, llama3.1-405b"),
]


@pytest.mark.parametrize("argv,message", REFUSALS, ids=[m[:40] for _, m in REFUSALS])
def test_impossible_runs_refused_with_one_line(argv, message, tmp_path, capsys):
    if "--nodes" not in argv:
        argv = ["--nodes", "256", *argv]
    if "--" in argv:
        i = argv.index("--")
        argv = argv[:i] + DATA + argv[i:]
    else:
        argv = argv + DATA
    code, out, err, script = sbatch(tmp_path, capsys, *argv)
    assert (code, err, script) == (2, f"megatron-llama sbatch: error: {message}\n", None)


def test_data_required(tmp_path, capsys):
    code, _, err, script = sbatch(tmp_path, capsys, "--preset", "7B", "--nodes", "256",
                                  "--data", "mix.yaml")
    assert (code, script) == (2, None)
    assert err == ("megatron-llama sbatch: error: pass --data BLEND.yaml with --tokenizer "
                   "MODEL, or --synthetic\n")


def test_help_explains_every_flag(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["sbatch"]
    for action in sub._actions:
        assert action.help, action.option_strings or action.dest
    with pytest.raises(SystemExit):
        cli.main(["sbatch", "--help"])
    text = capsys.readouterr().out
    for flag in ("--nodes", "--gpus-per-node", "--partition", "--account", "--time",
                 "--container", "--venv", "--signal-seconds", "--tp", "--vp", "--sp"):
        assert flag in text


def test_time_limits():
    assert slurm.time_limit_seconds("90") == 5400
    assert slurm.time_limit_seconds("10:30") == 630
    assert slurm.time_limit_seconds("24:00:00") == 86400
    assert slurm.time_limit_seconds("2-00:00:00") == 2 * 86400
    assert slurm.time_limit_seconds("1-12") == 36 * 3600
    assert slurm.time_limit_seconds("1-0:30") == 86400 + 1800


def test_one_template_shared_with_examples():
    """examples/slurm shows the package's files (no copies) and every paper preset has one."""
    family = ("llama2-70b", "llama3-70b", "llama3.1-405b")
    for name in ("llama.sbatch", *(f"{p}.env" for p in (*PAPER_LAYOUTS, *family))):
        assert (REPO / "examples" / "slurm" / name).resolve() == slurm.TEMPLATE_DIR / name
    for preset in (*PAPER_LAYOUTS, *family):
        values, _ = slurm.read_settings(slurm.TEMPLATE_DIR / f"{preset}.env")
        assert set(values) == set(slurm.SETTING_KEYS) | set(slurm.OPTIONAL_SETTINGS)


@pytest.mark.parametrize("preset, argv, summary, args", [
    ("llama2-70b", [], "TP=8 (SP) PP=4 VP=2 DP=64, micro batch 1 x 16 microbatches = global "
     "1024, 476,837 steps", []),
    ("llama3-70b", [], "TP=8 (SP) PP=4 VP=2 DP=64, micro batch 1 x 8 microbatches = global 512",
     []),
    ("llama3.1-405b", [], "TP=8 (SP) PP=16 VP=4 (embedding and loss as layers) DP=16, micro "
     "batch 1 x 128 microbatches = global 2048", ["--embedding-and-loss-as-layers"]),
    # the Llama 3 paper's 128k layout: CP=16
    ("llama3.1-405b", ["--cp", "16", "--seq-length", "131072", "--global-batch", "128"],
     "TP=8 (SP) CP=16 PP=16 VP=4 (embedding and loss as layers) DP=1, micro batch 1 x 128 "
     "microbatches = global 128", ["--cp", "16", "--embedding-and-loss-as-layers"]),
])
def test_family_presets_on_2048_gpus(preset, argv, summary, args, tmp_path, capsys):
    code, out, err, script = sbatch(tmp_path, capsys, "--preset", preset, "--nodes", "256",
                                    *DATA, *argv)
    assert code == 0, err
    assert f"{preset} on 256 nodes x 8 tasks = 2048, {summary}" in out
    assert ("CP=16  # overridden" in script) == ("--cp" in argv)
    # the pretrain flags the script builds, as bash expands them (settings, then ARGS)
    settings = script.split("# ---- settings")[1].split("# ---- environment")[0]
    training = script.split("# ---- training")[1].split("latest_step()")[0]
    rendered = subprocess.run(["bash", "-c", "#" + settings + "#" + training
                               + 'printf "%s\\n" "${ARGS[@]}"'],
                              capture_output=True, text=True, check=True,
                              env={"PATH": os.environ["PATH"]}).stdout.split()
    for flag in args:
        assert flag in rendered
    assert rendered[rendered.index("--tp") + 1] == "8"
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


# ---- a real Slurm ------------------------------------------------------------------------
TRAIN_STEPS, SAVE_INTERVAL = 80, 20
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_testing.ensure_installed()
    if reason:
        pytest.skip(reason)
    local = slurm_testing.LocalSlurm()
    try:
        local.start()
        yield local
    finally:
        local.stop()
        if os.environ.get("MEGATRON_LLAMA_KEEP_SLURM_DIR"):
            print(f"Slurm test folder kept: {local.root}")
        else:
            local.cleanup()


def _train_records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]


def _latest(ckpt: Path) -> int:
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else 0


@pytest.fixture(scope="module")
def preempted_job(cluster):
    """Render, submit, wait for training + a checkpoint, send the time-limit signal, wait for
    the requeued job to finish. Returns what was observed at each point."""
    runs = cluster.root / "runs"
    script = cluster.root / "tiny.sbatch"
    render = subprocess.run(
        [sys.executable, "-m", "megatron_llama.cli", "sbatch", "--preset", "tiny",
         "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--partition", "debug", "--time", "20", "--job-name", "tiny-slurm",
         "--venv", sys.prefix, "--run-root", str(runs), "--output", str(script),
         "--synthetic", "--pp", "2", "--micro-batch", "2", "--global-batch", "4",
         "--seq-length", "64", "--train-steps", str(TRAIN_STEPS),
         "--save-interval", str(SAVE_INTERVAL), "--signal-seconds", "60",
         "--", "--peak-tflops", "1", "--warmup-steps", "2"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert render.returncode == 0, render.stderr
    job = cluster.submit(str(script))
    run_dir = runs / f"tiny-slurm-{job}"
    ckpt, output = run_dir / "checkpoints", runs / f"tiny-slurm-{job}.out"

    def state() -> dict:
        info = cluster.job(job)
        if info["JobState"] in FAILED_STATES:
            raise AssertionError(f"job {job} {info['JobState']}:\n" + _read(output)
                                 + _read_all(run_dir / "logs") + cluster.log_tails())
        return info

    def trained_and_checkpointed():
        info = state()
        if info["JobState"] == "COMPLETED":
            raise AssertionError(f"job finished before it could be preempted: raise "
                                 f"TRAIN_STEPS\n{_read(output)}")
        return info["JobState"] == "RUNNING" and _latest(ckpt) >= SAVE_INTERVAL and len(
            _train_records(ckpt / "log.jsonl")) > SAVE_INTERVAL
    cluster.wait_for(trained_and_checkpointed, 300, "training and a first checkpoint")
    before = dict(job=state(), latest=_latest(ckpt),
                  steps=[r["step"] for r in _train_records(ckpt / "log.jsonl")])
    # What Slurm does N seconds before the time limit with --signal=B:USR1@N.
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    cluster.wait_for(lambda: state()["Restarts"] != "0", 120, "the job to requeue itself")
    cluster.wait_for(lambda: state()["JobState"] == "COMPLETED", 300,
                     "the requeued job to resume and finish")
    return dict(before=before, job=state(), ckpt=ckpt, output=_read(output),
                logs=[_read(run_dir / "logs" / f"train-restart{i}.log") for i in (0, 1)],
                records=_train_records(ckpt / "log.jsonl"))


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)\n"


def _read_all(folder: Path) -> str:
    return "".join(f"--- {p.name}\n{_read(p)}" for p in sorted(folder.glob("*")))


@pytest.mark.slurm
def test_slurm_job_trains_and_checkpoints_on_two_nodes(preempted_job):
    before = preempted_job["before"]
    assert before["job"]["JobState"] == "RUNNING" and before["job"]["Restarts"] == "0"
    assert before["job"]["NumNodes"] == "2" and before["job"]["NodeList"] == "n[1-2]"
    assert before["latest"] >= SAVE_INTERVAL and before["latest"] % SAVE_INTERVAL == 0
    assert before["steps"][:SAVE_INTERVAL] == list(range(1, SAVE_INTERVAL + 1))


@pytest.mark.slurm
def test_slurm_job_requeued_after_signal_and_resumed_from_checkpoint(preempted_job):
    first, second = preempted_job["logs"]
    stopped = re.search(r"stopped by a signal after step (\d+); checkpoint saved", first)
    assert stopped, first
    k = int(stopped.group(1))
    assert preempted_job["before"]["latest"] <= k < TRAIN_STEPS
    assert f"starting at step {k + 1}" in second, second
    out = preempted_job["output"]
    assert "restart 0:" in out and "SIGUSR1 (time limit or preemption ahead)" in out
    assert f"stopped at checkpoint step {k} of {TRAIN_STEPS} (srun exit 0): requeueing" in out
    assert f"restart 1: tiny on 2 nodes (2 tasks), TP=1 PP=2 VP=1 SP=0 CP=1, checkpoint step {k}" in out
    # every step logged exactly once across the two runs: the second continued the first
    records = preempted_job["records"]
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))
    assert records[k]["consumed_samples"] == (k + 1) * 4  # data position restored too


@pytest.mark.slurm
def test_slurm_job_finished_after_requeue(preempted_job):
    job = preempted_job["job"]
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0")
    assert _latest(preempted_job["ckpt"]) == TRAIN_STEPS
    assert f"finished: checkpoint at step {TRAIN_STEPS} of {TRAIN_STEPS}" in preempted_job["output"]
    assert not any(p.name.endswith(".tmp") for p in preempted_job["ckpt"].iterdir())


@pytest.mark.slurm
def test_slurm_job_requeued_after_a_hang_within_its_retry_budget(cluster):
    """Rank 1 stops in step 3 every time: the watchdog ends the step (exit 124) with both
    ranks' stacks, srun ends the job step, the script requeues once (--max-retries 1), then
    gives up at the same checkpoint step."""
    runs = cluster.root / "hang-runs"
    script = cluster.root / "hang.sbatch"
    render = subprocess.run(
        [sys.executable, "-m", "megatron_llama.cli", "sbatch", "--preset", "tiny",
         "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--partition", "debug", "--time", "20", "--job-name", "tiny-hang",
         "--venv", sys.prefix, "--run-root", str(runs), "--output", str(script),
         "--synthetic", "--micro-batch", "2", "--global-batch", "4", "--seq-length", "64",
         "--train-steps", "1000", "--save-interval", "100", "--max-retries", "1",
         "--env", "MEGATRON_LLAMA_TEST_HANG_AT=3:1",
         "--", "--peak-tflops", "1", "--warmup-steps", "2", "--hang-timeout", "5"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert render.returncode == 0, render.stderr
    job = cluster.submit(str(script))
    output = runs / f"tiny-hang-{job}.out"
    cluster.wait_for(lambda: cluster.job(job)["JobState"] == "FAILED", 600,
                     "the job to hang, requeue once and give up")
    info = cluster.job(job)
    assert info["Restarts"] == "1", info
    out = _read(output)  # srun's status: 124 from the watchdog, or 143 for a task it ended
    assert re.search(r"training failed \(srun exit 1[24][34]\) at checkpoint step 0: requeueing "
                     rf"job {job} \(retry 1 of 1 at this step\)", out), out
    assert re.search(r"training failed \(srun exit 1[24][34]\) at checkpoint step 0; 1 retries "
                     "at this step spent: not requeued", out), out
    assert "No such file" not in out, out
    for restart in (0, 1):
        log = _read(runs / f"tiny-hang-{job}" / "logs" / f"train-restart{restart}.log")
        for rank in (0, 1):
            assert re.search(rf"{rank}: megatron-llama pretrain: error: rank {rank} made no "
                             r"progress for \d+ s after step 2, in step 3", log), log
        assert "in injected_hang" in log, log
