"""A new user's path: own text, `--data` forms, one-line errors, memory, schedules, files."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from megatron_llama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "megatron_llama.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_llama.data.tokenizer import Tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    text = d / "t.txt"
    text.write_text("\n".join(f"line {i} of some words, more words {i * 7}" for i in range(400)))
    return Tokenizer(train_tokenizer([str(text)], str(d / "tok"), vocab_size=300,
                                     progress=False))


def read_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_plain_text_documents_by_line_paragraph_or_file(tokenizer, tmp_path):
    from megatron_llama.data.preprocess import preprocess

    text = tmp_path / "book.txt"
    text.write_text("First paragraph,\nits second line.\n\n\nSecond paragraph.\n\nThird\n")
    eos = [tokenizer.eos_id]
    expected = {
        "line": ["First paragraph,", "its second line.", "Second paragraph.", "Third"],
        "paragraph": ["First paragraph,\nits second line.", "Second paragraph.", "Third"],
        "file": ["First paragraph,\nits second line.\n\n\nSecond paragraph.\n\nThird"],
    }
    for mode, docs in expected.items():
        prefix = str(tmp_path / mode)
        stats = preprocess([str(text)], prefix, tokenizer.model_path, progress=False,
                           txt_documents=mode)
        assert read_dataset(prefix) == [tokenizer.encode(d) + eos for d in docs], mode
        assert stats.bad_total == 0, mode  # blank lines separate documents: not bad records


def test_output_prefix_must_name_files(tokenizer, tmp_path):
    from megatron_llama.data.preprocess import preprocess

    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    for prefix in (str(tmp_path) + "/", str(tmp_path)):
        with pytest.raises(ConfigError, match="is a directory; --output-prefix names the "
                                              "dataset files, e.g. .*mydata"):
            preprocess([str(text)], prefix, tokenizer.model_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]  # no hidden .bin/.idx


def test_data_takes_yaml_prefix_or_weighted_pairs(tokenizer, tmp_path, capsys):
    from megatron_llama import cli
    from megatron_llama.data.blend import load_blend, resolve_data

    for name in ("code", "prose"):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(f"{name} document {i}" for i in range(1200)))
        blend = str(tmp_path / "blend.yaml")
        assert cli.main(["preprocess", "--input", str(path), "--output-prefix",
                         str(tmp_path / name), "--tokenizer", tokenizer.model_path,
                         "--no-progress", "--blend", blend, "--blend-weight",
                         "0.7" if name == "code" else "0.3"]) == 0
    assert f"to {blend}; train on it with: megatron-llama pretrain --data {blend}" \
        in capsys.readouterr().out
    from_yaml = load_blend(blend)
    assert [(s.name, s.prefix, s.weight) for s in from_yaml.sources] == [
        ("code", str(tmp_path / "code"), 0.7), ("prose", str(tmp_path / "prose"), 0.3)]
    assert "prefix: code" in open(blend).read()  # relative to the YAML: the folder can move
    pairs = resolve_data(["0.7", str(tmp_path / "code"), "0.3", str(tmp_path / "prose.bin")])
    assert pairs.sources == from_yaml.sources
    one = resolve_data(str(tmp_path / "code"))
    assert [(s.prefix, s.weight) for s in one.sources] == [(str(tmp_path / "code"), 1.0)]
    one.check_files()
    with pytest.raises(ConfigError, match="is a directory; --data takes a blend YAML, a "
                                          "dataset prefix"):
        resolve_data(str(tmp_path))
    with pytest.raises(ConfigError, match="several values must be weight/prefix pairs"):
        resolve_data(["0.7", str(tmp_path / "code"), "0.3"])
    with pytest.raises(ConfigError, match="'code' is not a weight"):
        resolve_data(["code", "0.7"])
    with pytest.raises(ConfigError, match=r"missing: no missing.bin/.idx \(run"):
        resolve_data(["1", "missing", "1", str(tmp_path / "code")])
    with pytest.raises(ConfigError, match="is a directory, not a blend YAML"):
        load_blend(str(tmp_path))


def test_outputs_respect_the_umask(tokenizer, tmp_path):
    from megatron_llama.data.preprocess import preprocess
    from megatron_llama.fileio import staged_directory

    text = tmp_path / "a.txt"
    text.write_text("one\ntwo\n")
    old = os.umask(0o022)
    try:
        preprocess([str(text)], str(tmp_path / "ds"), tokenizer.model_path, progress=False)
        with staged_directory(str(tmp_path / "converted")) as tmp:
            open(os.path.join(tmp, "params.json"), "w").close()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "ds.bin") == mode(tmp_path / "ds.idx") == 0o644
    assert mode(tmp_path / "converted") == 0o755
    assert mode(tmp_path / "converted" / "params.json") == 0o644


def test_memory_is_checked_before_anything_starts():
    from megatron_llama.model.presets import get_preset
    from megatron_llama.parallel import ParallelLayout
    from megatron_llama.training import memory
    from megatron_llama.training.recipe import TrainConfig

    preset = get_preset("7B")
    cfg = TrainConfig.from_preset(preset, micro_batch=1, dtype="fp32", train_steps=10,
                                  layout=ParallelLayout())
    # 7B in fp32 on DP=2: fp32 weights and grads, Adam moments sharded over the 2 ranks
    mem = memory.run_memory(cfg, 2, on_gpu=False)
    assert mem.weights + mem.gradients + mem.optimizer == preset.model.num_params() * (4 + 4 + 4)
    with pytest.raises(ConfigError) as e:
        memory.check_memory_fits(cfg, 2, ranks_here=2)  # this machine: 24 GB for 2 ranks
    message = str(e.value)
    assert "\n" not in message and message.startswith("not enough memory: about ")
    assert "shared by 2 ranks" in message and "--skip-memory-check" in message
    assert "no layout of 2 rank(s) fits" in message
    # with 8 ranks and a 45 GB budget each, the check names flags under which it fits
    flags = memory._alternatives(cfg, 8, 45e9, on_gpu=False)
    assert flags and not memory._fits(cfg, 8, 45e9, on_gpu=False)
    changes = dict(zip(flags.split()[::2], flags.split()[1::2]))
    import dataclasses

    fitted = dataclasses.replace(
        cfg, layout=ParallelLayout(tp=int(changes.get("--tp", 1)), pp=int(changes.get("--pp", 1))),
        recompute=changes.get("--recompute", cfg.recompute))
    assert memory._fits(fitted, 8, 45e9, on_gpu=False)


def test_short_runs_warn_about_the_warmup(capsys):
    from megatron_llama.model.presets import get_preset
    from megatron_llama.training.loop import preflight
    from megatron_llama.training.recipe import TrainConfig

    cfg = TrainConfig.from_preset(get_preset("tiny"), train_steps=3, dtype="fp32")
    preflight(cfg, 1)
    err = capsys.readouterr().err
    assert err == ("warning: 2000 warmup steps do not fit in 3 training steps; warming up "
                   "over 2 step(s) and decaying over the rest (set --warmup-steps to choose)\n")
    preflight(TrainConfig.from_preset(get_preset("tiny"), train_steps=3, warmup_steps=1,
                                      dtype="fp32"), 1)
    assert capsys.readouterr().err == ""


def test_sbatch_never_overwrites_or_invents_folders(tmp_path, capsys):
    from megatron_llama import cli

    out = tmp_path / "job.sbatch"
    argv = ["sbatch", "--preset", "tiny", "--nodes", "1", "--gpus-per-node", "0",
            "--run-root", str(tmp_path / "runs"), "--data", str(tmp_path / "nope.yaml"),
            "--tokenizer", str(tmp_path / "tok.model"), "--output", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"warning: --data {tmp_path / 'nope.yaml'} does not exist on this machine" \
        in captured.err
    assert f"warning: --tokenizer {tmp_path / 'tok.model'} does not exist" in captured.err
    assert f"created {tmp_path / 'runs'}" in captured.out
    assert cli.main(argv) == 2
    assert f"{out}: already exists (pass --force to replace it)" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0
    capsys.readouterr()
    missing = tmp_path / "no" / "such" / "job.sbatch"
    assert cli.main(argv[:-1] + [str(missing)]) == 2
    assert "no such directory for --output (create it first)" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_65b_preset_explains_how_it_differs_from_the_planners_best():
    from megatron_llama.bench.planner import GPUS, PlanLayout, evaluate, plan
    from megatron_llama.launch.slurm import TEMPLATE_DIR
    from megatron_llama.model.presets import get_preset

    cfg = get_preset("65B").model
    gpu = GPUS["a100-80gb"]
    text = (TEMPLATE_DIR / "65B.env").read_text()
    preset = evaluate(cfg, PlanLayout(tp=8, sp=True, pp=4, vp=2, dp=64, micro_batch=1,
                                      recompute="selective"), 2048, 2048, gpu)
    best = plan(cfg, 2048, gpu, 2048, 2048)[0]
    assert best.layout != preset.layout
    for candidate in (preset, best):  # the numbers the comment quotes are the planner's
        assert f"{candidate.tokens_per_s_per_gpu:.0f}" in text
        assert f"{candidate.memory.total / 1e9:.1f} GB" in text


@pytest.mark.slow
def test_no_rendezvous_file_is_left_behind(tmp_path):
    code = ("from megatron_llama.parallel import init_distributed; print(init_distributed())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert out.returncode == 0 and out.stdout.strip() == "(0, 1)", out.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_impossible_runs_are_refused_once_before_any_rank_starts(tmp_path):
    result = run_cli("pretrain", "--preset", "7B", "--synthetic", "--nproc-per-node", "2")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-llama pretrain: error: not enough "
                                                   "memory: about "), result.stderr
    result = run_cli("pretrain", "--synthetic", "--nproc-per-node", "2", "--tp", "3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "megatron-llama pretrain: error: n_heads=4 is not divisible by TP=3 (legal TP: 1, 2, 4)"]
    result = run_cli("pretrain", "--data", str(tmp_path), "--tokenizer", "x.model",
                     "--nproc-per-node", "2")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr


TINY_RUN = ["pretrain", "--synthetic", "--nproc-per-node", "2", "--tp", "2", "--dim", "64",
            "--n-layers", "2", "--n-heads", "4", "--vocab-size", "128", "--multiple-of", "16",
            "--max-seq-len", "32", "--micro-batch", "1", "--global-batch", "2",
            "--warmup-steps", "1"]


@pytest.mark.multiprocess
def test_rank_errors_are_one_line_and_follow_on_errors_hidden(tmp_path):
    # every rank refuses the same broken checkpoint: the line is printed once
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest_checkpointed_iteration.txt").write_text("5")
    result = run_cli(*TINY_RUN, "--train-steps", "2", "--save", str(broken))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"megatron-llama pretrain: error: {broken}/latest_checkpointed_iteration.txt: names no "
        "complete checkpoint ('5')"], result.stderr
    # one rank crashes: its traceback, one line naming it, nothing from the rank left waiting
    start = time.monotonic()
    result = run_cli(*TINY_RUN, "--train-steps", "2",
                     env={"MEGATRON_LLAMA_TEST_FAIL_RANK": "1"})
    assert result.returncode == 1
    assert "RuntimeError: fault injection: rank 1 fails" in result.stderr
    assert result.stderr.rstrip().endswith(
        "megatron-llama pretrain: error: rank 1 failed with exit code 1 (its output is above)")
    assert result.stderr.count("Traceback") == 1
    assert time.monotonic() - start < 120  # rank 0 was stopped, not left in its collective


@pytest.mark.multiprocess
def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line(tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_llama.cli", *TINY_RUN,
                             "--train-steps", "100000", "--save", str(save)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    log = save / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    last = [line for line in out.splitlines() if line.startswith("stopped by a signal")]
    assert len(last) == 1 and last[0].endswith(
        f"checkpoint saved in {save} (the same command resumes)"), out
    step = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert f"after step {step};" in last[0]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.slow
def test_resume_with_other_train_steps_keeps_or_replans_the_schedule(megatron_single, tmp_path,
                                                                      capsys):
    import json

    from megatron_llama.model.config import LlamaConfig
    from megatron_llama.training.loop import pretrain
    from megatron_llama.training.recipe import TrainConfig, lr_at

    model = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=16,
                        max_seq_len=32)

    def run(save, steps, **kw):
        cfg = TrainConfig(model=model, seq_length=32, global_batch=2, train_steps=steps,
                          warmup_steps=1, lr=1e-3, dtype="fp32", save_dir=str(save),
                          load_dir=str(save), **kw)
        pretrain(cfg)
        records = [json.loads(line) for line in open(save / "log.jsonl")]
        return cfg, {r["step"]: r["lr"] for r in records if "lr" in r}

    first, _ = run(tmp_path / "keep", 4)
    capsys.readouterr()
    _, lrs = run(tmp_path / "keep", 6)  # continues the checkpoint's schedule, and says so
    err = capsys.readouterr().err
    assert ("warning: this run's schedule differs from the checkpoint's (train steps 4 -> 6); "
            "continuing the checkpoint's: peak 0.001, 1 warmup steps, cosine to 10% at step 4 "
            "(--override-schedule re-plans it)") in err
    assert lrs[5] == pytest.approx(lr_at(5, first)) == pytest.approx(first.min_lr)

    run(tmp_path / "replan", 4)
    capsys.readouterr()
    longer, lrs = run(tmp_path / "replan", 6, override_schedule=True)
    assert "re-planning the lr schedule from this run's flags (train steps 4 -> 6)" in \
        capsys.readouterr().err
    assert lrs[5] == pytest.approx(lr_at(5, longer)) and lrs[5] > longer.min_lr * 1.01


def _interrupt_when(proc, ready, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} ended before it could be interrupted"
        assert time.monotonic() < deadline, f"{what} never started writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=300)


@pytest.mark.slow
def test_ctrl_c_in_convert_and_preprocess_is_one_line_and_leaves_nothing(tokenizer, tmp_path):
    from tests.test_convert_streaming import BIG, _synthetic

    meta = tmp_path / "meta"
    _synthetic(str(meta), BIG)  # 436 MB: long enough to be caught while writing
    proc = subprocess.Popen([sys.executable, "-m", "megatron_llama.cli", "convert", "--input",
                             str(meta), "--output", str(tmp_path / "hf"), "--to", "hf",
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    staged = lambda: [p for p in tmp_path.glob(".hf.tmp-*/*") if p.stat().st_size]  # noqa
    out, err = _interrupt_when(proc, staged, "convert")
    assert proc.returncode == 130, err
    assert err == "megatron-llama convert: interrupted; nothing partial was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]

    text = tmp_path / "big.txt"
    with open(text, "w") as f:
        for i in range(400_000):
            f.write(f"line {i} of some words, more words {i * 7} and more words\n")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_llama.cli", "preprocess",
                             "--input", str(text), "--output-prefix", str(tmp_path / "ds"),
                             "--tokenizer", tokenizer.model_path, "--workers", "2",
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    started = lambda: [p for p in tmp_path.glob(".ds.*.bin.tmp") if p.stat().st_size]  # noqa
    out, err = _interrupt_when(proc, started, "preprocess")
    assert proc.returncode == 130, err
    assert err == "megatron-llama preprocess: interrupted; nothing partial was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "meta"]


HF_STRINGS = [" leading", "hello world", "  two  spaces", "\ttab first", "\nnewline first",
              "trailing  ", "12345 678", "é ü 中文 😀 👍🏽", "a literal <s> and </s> and <unk>",
              "\u2581literal escape", "def f(x):\n    return x  # done\n", "", "x"]
HF_CHECK = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
out = []
for s in json.loads(sys.argv[2]):
    ids = tok(s)["input_ids"]
    out.append([ids, tok.decode(ids, skip_special_tokens=True)])
import transformers
print(json.dumps({"version": transformers.__version__, "results": out}))
"""


def _sentencepiece_reference(tokenizer):
    # decoding is SentencePiece's too: a literal U+2581 comes back as a space there as well
    return [[tokenizer.encode(s, bos=True), tokenizer.decode(tokenizer.encode(s))]
            for s in HF_STRINGS]


def _export_tokenizer(tokenizer, directory):
    from megatron_llama.convert.hf_tokenizer import write_hf_tokenizer_files

    write_hf_tokenizer_files(tokenizer.model_path, str(directory))
    return str(directory)


def _check_with(python, directory):
    import json

    out = subprocess.run([python, "-c", HF_CHECK, directory, json.dumps(HF_STRINGS)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
                                  TRANSFORMERS_VERBOSITY="error"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hf_tokenizer_encodes_like_sentencepiece(tokenizer, tmp_path):
    """transformers as pinned for the tests (4.47.1): AutoTokenizer on the export."""
    report = _check_with(sys.executable, _export_tokenizer(tokenizer, tmp_path / "hf"))
    assert report["version"] == "4.47.1"
    assert report["results"] == _sentencepiece_reference(tokenizer)


def _latest_transformers_python() -> str:
    """A virtualenv with the transformers a user gets from PyPI today (no torch needed for
    tokenizers), made once and cached; MEGATRON_LLAMA_TEST_TRANSFORMERS_PYTHON overrides."""
    override = os.environ.get("MEGATRON_LLAMA_TEST_TRANSFORMERS_PYTHON")
    if override:
        return override
    venv = os.path.join(os.path.expanduser("~"), ".cache", "megatron_llama", "transformers-latest")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
        subprocess.run([python, "-m", "pip", "install", "-q", "transformers", "sentencepiece",
                        "protobuf"], check=True, timeout=1200)
    return python


@pytest.mark.slow
def test_hf_tokenizer_encodes_like_sentencepiece_with_todays_transformers(tokenizer, tmp_path):
    report = _check_with(_latest_transformers_python(),
                         _export_tokenizer(tokenizer, tmp_path / "hf"))
    assert int(report["version"].split(".")[0]) >= 5, report["version"]
    assert report["results"] == _sentencepiece_reference(tokenizer)


def test_convert_never_writes_over_or_into_its_input(tmp_path):
    from megatron_llama.convert.run import convert

    inp = tmp_path / "outer" / "in"
    inp.mkdir(parents=True)
    (inp / "params.json").write_text("{}")
    for output, message in ((inp, "is the input itself"),
                            (tmp_path / "outer", "contains the input .*replacing it would "
                                                 "delete the input"),
                            (tmp_path, "contains the input"),
                            (inp / "out", "lies inside the input")):
        with pytest.raises(ConfigError, match=message):
            convert(str(inp), str(output), "meta", force=True, progress=False)
    assert (inp / "params.json").read_text() == "{}"  # untouched
    with pytest.raises(ConfigError, match="is the input itself"):  # also through a symlink
        os.symlink(inp, tmp_path / "alias")
        convert(str(inp), str(tmp_path / "alias"), "meta", force=True, progress=False)

