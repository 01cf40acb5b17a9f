"""Evaluation against an oracle: the megatron_llama backend on a Megatron checkpoint at
TP=2 gives the per-request log-likelihoods of lm-eval's own `hf` backend on the Hugging
Face export of the same model (<= 1e-4), the same accuracies and the same generations; the
paper's scoring matches a hand computation from the `hf` backend; bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                  max_seq_len=256)
LIMIT = "16"


def run_cli(*args, ok=True, timeout=900):
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", *args],
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory, megatron_single):
    """A random tiny model as Meta, Megatron (via convert) and Hugging Face directories."""
    from megatron_llama.convert.run import convert
    from megatron_llama.data.corpus import pydoc_documents
    from megatron_llama.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("evaluate")
    (d / "prose.txt").write_text("\n".join(p["text"] for p in pydoc_documents()))
    tok = train_tokenizer([str(d / "prose.txt")], str(d / "tok"), vocab_size=CFG.vocab_size)
    meta = d / "meta"
    meta.mkdir()
    torch.save(random_meta_weights(CFG, seed=11), meta / "consolidated.00.pth")
    CFG.to_params_json(str(meta / "params.json"))
    shutil.copy(tok, meta / "tokenizer.model")
    convert(str(meta), str(d / "megatron"), "megatron", progress=False)
    convert(str(meta), str(d / "hf"), "hf", progress=False)
    return d


@pytest.mark.multiprocess
def test_backend_equals_lm_evals_hf_backend(model, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from megatron_llama.evaluate.paper import ANSWER_CONTEXT
    from megatron_llama.evaluate.run import suite_dir, task_manager
    from megatron_llama.evaluate.suite import TASKS

    out = tmp_path / "results.json"
    printed = run_cli("evaluate", "--checkpoint", str(model / "megatron"), "--tasks", "suite",
                      "--tp", "2", "--nproc-per-node", "2", "--limit", LIMIT, "--log-samples",
                      "--output", str(out)).stdout
    assert "acc_paper" in printed and "mini_hellaswag" in printed
    ours = json.loads(out.read_text())
    rows = {(r["task"], r["metric"]): r for r in ours["results"]}

    manager = task_manager((), TASKS)
    hf = HFLM(pretrained=str(model / "hf"), dtype="float32", device="cpu", batch_size=16,
              add_bos_token=True)
    theirs = lm_eval.simple_evaluate(model=hf, tasks=list(TASKS), limit=float(LIMIT),
                                     task_manager=manager, log_samples=True)
    largest, same_text, rolled = 0.0, 0, 0
    for task in TASKS:
        mine = {(s["doc_id"], i): r for s in ours["samples"][task]
                for i, r in enumerate(s["resps"])}
        ref = {(s["doc_id"], i): r for s in theirs["samples"][task]
               for i, r in enumerate(s["filtered_resps"])}
        assert mine.keys() == ref.keys() and len(mine) >= int(LIMIT)
        for key, r in ref.items():
            if isinstance(r, (int, float)) or isinstance(mine[key], (int, float)):
                # loglikelihood_rolling: one total per document (hundreds of nats, fp32)
                assert abs(float(mine[key]) - float(r)) <= 1e-6 * abs(float(r)), (task, key)
                rolled += 1
            elif isinstance(r, str):  # generate_until: the same greedy text, except where a
                # random model emits invalid UTF-8 byte runs, which SentencePiece decodes
                # byte by byte and HF's ByteFallback as U+FFFD each: equal up to there
                cut = r.find("\ufffd")
                assert (mine[key] == r if cut < 0 else mine[key][:cut] == r[:cut]), (
                    task, key, mine[key], r)
                same_text += mine[key] == r
            else:
                largest = max(largest, abs(mine[key][0] - r[0]))
                assert mine[key][1] == r[1], (task, key)
        for metric, value in theirs["results"][task].items():
            name = metric.split(",")[0]
            if "," in metric and "_stderr" not in metric:
                mine_value = rows[(task, name)]["value"]
                if name in ("acc", "acc_norm", "exact_match"):  # counts: identical
                    assert mine_value == value, (task, metric)
                else:  # perplexities: exp() of the sums compared above
                    assert abs(mine_value - value) <= 1e-5 * abs(value), (task, metric)
    assert largest <= 1e-4, largest
    assert same_text >= 4  # generations compared whole
    assert rolled == int(LIMIT)  # rolling log-likelihoods (perplexity task) compared
    print(f"largest log-likelihood difference: {largest:.2e}")
    # the paper's rule: characters for the others (= acc_norm), "Answer:" for BoolQ
    for task in ("mini_hellaswag", "mini_piqa", "mini_arc"):
        assert rows[(task, "acc_paper")]["value"] == rows[(task, "acc_norm")]["value"]
    right = 0
    for s in theirs["samples"]["mini_boolq"]:
        conts = [c for _, c in s["arguments"]]
        given = [r[0] for r in s["filtered_resps"]]
        alone = [ll for ll, _ in hf.loglikelihood(
            [type("R", (), {"args": (ANSWER_CONTEXT, c)})() for c in conts])]
        pick = max(range(len(conts)), key=lambda i: given[i] - alone[i])
        right += pick == int(s["target"])
    assert rows[("mini_boolq", "acc_paper")]["value"] == right / len(theirs["samples"]["mini_boolq"])
    assert os.path.isdir(suite_dir())

    # PP=2 and one-shot prompts: the same per-request numbers as the hf backend's
    few = tmp_path / "pp2.json"
    run_cli("evaluate", "--checkpoint", str(model / "megatron"), "--tasks", "mini_arc",
            "mini_wikitext", "--num-fewshot", "1", "--pp", "2", "--nproc-per-node", "2",
            "--limit", "8", "--log-samples", "--output", str(few))
    ours = json.loads(few.read_text())
    theirs = lm_eval.simple_evaluate(model=hf, tasks=["mini_arc", "mini_wikitext"], limit=8.0,
                                     num_fewshot=1, task_manager=manager, log_samples=True)
    for task in ("mini_arc", "mini_wikitext"):
        ref = theirs["samples"][task]
        if task == "mini_arc":  # one solved example before the question
            assert str(ref[0]["arguments"][0][0]).count("Answer:") == 2
        for mine, s in zip(ours["samples"][task], ref):
            for a, b in zip(mine["resps"], s["filtered_resps"]):
                a, b = (float(a), float(b)) if isinstance(b, (int, float)) else (a[0], b[0])
                # a request: <= 1e-4; a document's rolling total (hundreds of nats): 1e-6 of it
                assert abs(a - b) <= max(1e-4, 1e-6 * abs(b)), (task, a, b)


def test_bad_input_is_one_line(model, tmp_path, capsys):
    from megatron_llama.cli import main

    bad_task = tmp_path / "tasks"
    bad_task.mkdir()
    (bad_task / "broken.yaml").write_text(
        "task: broken_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n")
    (bad_task / "no_choices.yaml").write_text(
        "task: no_choices\ndataset_path: json\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: x\ndoc_to_target: 0\n")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hub.yaml").write_text("task: hub_task\ndataset_path: some-org/some-dataset\n"
                                  "output_type: multiple_choice\ndoc_to_text: x\n"
                                  "doc_to_target: 0\ndoc_to_choice: [a, b]\n")
    cases = [
        (["--tasks", "mini_hellaswagg"], "unknown task 'mini_hellaswagg'; did you mean "
                                         "mini_hellaswag"),
        (["--tasks", "broken_task", "--include-path", str(bad_task)], "broken.yaml"),
        (["--tasks", "no_choices", "--include-path", str(bad_task)],
         "no_choices.yaml: task no_choices has no doc_to_choice"),
        (["--tasks", "hub_task", "--include-path", str(hub)], "from the Hugging Face Hub, and "
                                                              "evaluation is offline"),
    ]
    for extra, message in cases:
        code = main(["evaluate", "--checkpoint", str(model / "meta"), *extra,
                     "--output", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code = main(["evaluate", "--checkpoint", str(tmp_path), "--tasks", "suite"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown checkpoint format" in err
    assert not (tmp_path / "r.json").exists()


def test_perplexity_of_the_validation_split(model, tmp_path):
    """`evaluate --perplexity` scores the validation sequences pretrain builds from a dataset
    prefix; the reference forward over the same sequences gives the same perplexity."""
    import math

    from megatron_llama.cli import main
    from megatron_llama.data.blend import build_gpt_datasets, resolve_data
    from megatron_llama.data.corpus import pydoc_documents
    from megatron_llama.data.preprocess import preprocess
    from megatron_llama.data.tokenizer import Tokenizer
    from tests.llama_testing import reference_logits

    docs = tmp_path / "docs.jsonl"
    paragraphs = [p for d in pydoc_documents() for p in d["text"].split("\n\n") if p.strip()]
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:1200]))
    tokenizer = str(model / "meta" / "tokenizer.model")
    preprocess([str(docs)], str(tmp_path / "val"), tokenizer, workers=1, progress=False)
    out = tmp_path / "ppl.json"
    assert main(["evaluate", "--checkpoint", str(model / "meta"), "--perplexity",
                 str(tmp_path / "val"), "--perplexity-samples", "4", "--output", str(out)]) == 0
    rows = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    tok = Tokenizer(tokenizer)
    _, valid, _ = build_gpt_datasets(resolve_data(str(tmp_path / "val")),
                                     vocab_size=tok.vocab_size, eod=tok.eos_id,
                                     seq_length=CFG.max_seq_len, samples=(1, 4, 0), seed=1234)
    weights = torch.load(model / "meta" / "consolidated.00.pth", weights_only=True)
    total, count = 0.0, 0
    for i in range(4):
        s = valid[i]
        tokens, labels = torch.as_tensor(s["tokens"])[None], torch.as_tensor(s["labels"])
        logits = reference_logits(weights, CFG, tokens)[0].double()
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        count += len(labels)
    assert rows["perplexity"]["n"] == 4 and rows["loss"]["n"] == count
    assert abs(rows["loss"]["value"] - total / count) <= 1e-5 * total / count
    assert abs(rows["perplexity"]["value"] - math.exp(total / count)) <= 1e-4 * math.exp(
        total / count)


def test_installing_registers_the_backend_for_lm_eval_lazily():
    """The installed .pth hook: a fresh interpreter registers megatron_llama the moment
    lm-eval loads its models, without importing the package (a checkout in the current
    directory is not shadowed), torch or megatron-core."""
    code = ("import sys; hooked = any(type(f).__module__ == "
            "'megatron_llama_lm_eval_hook' for f in sys.meta_path); "
            "import lm_eval.models; from lm_eval.api.registry import model_registry; "
            "print(hooked, 'megatron_llama' in model_registry, sorted(m for m in ('torch', "
            "'megatron', 'megatron_llama') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "[]"], out.stdout


def test_lm_eval_command_line_runs_the_backend(model, tmp_path):
    """The stock `lm_eval` command finds --model megatron_llama (the package's entry point,
    registered by its .pth hook) and runs it under torchrun at TP=2, rank 0 driving; and
    `megatron-llama lm-eval`, the same CLI with the backend imported first."""
    from megatron_llama.evaluate.run import suite_dir, task_manager

    task_manager((), ["mini_arc"])  # writes the suite
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_DATASETS_OFFLINE="1")
    lm_eval_script = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    assert os.path.isfile(lm_eval_script), lm_eval_script
    common = ["run", "--model", "megatron_llama", "--tasks", "mini_arc", "--include_path",
              suite_dir(), "--limit", "4", "--batch_size", "4"]
    stock = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         lm_eval_script, *common, "--model_args", f"checkpoint={model / 'megatron'},tp=2"],
        capture_output=True, text=True, timeout=600, env=env)
    assert stock.returncode == 0, stock.stderr[-2000:]
    assert "mini_arc" in stock.stdout and "acc_norm" in stock.stdout
    assert "'tp': 2}" in stock.stdout  # lm-eval's header line echoes the model args
    ours = subprocess.run(
        [sys.executable, "-m", "megatron_llama.cli", "lm-eval", *common, "--model_args",
         f"checkpoint={model / 'meta'}"], capture_output=True, text=True, timeout=600, env=env)
    assert ours.returncode == 0, ours.stderr[-2000:]
    table = [line for line in ours.stdout.splitlines() if "|none  |" in line]
    assert len(table) == 2 and table == [line for line in stock.stdout.splitlines()
                                         if "|none  |" in line]  # TP2 == TP1: same scores
