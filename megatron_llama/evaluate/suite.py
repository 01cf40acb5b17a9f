"""The built-in evaluation suite: small tasks in the formats of the paper's benchmarks,
written by this project (no download), as lm-eval task YAMLs over local JSON files.

    mini_hellaswag  context + 4 endings          (HellaSwag's fields: ctx, endings, label)
    mini_piqa       goal + 2 solutions           (PIQA: goal, sol1, sol2, label)
    mini_boolq      passage + yes/no question    (BoolQ: passage, question, answer)
    mini_arc        question + 4 lettered choices (ARC: question, choices{text,label}, answerKey)
    mini_triviaqa   question -> short answer     (TriviaQA: question, answer{value, aliases})
    mini_wikitext   whole documents, perplexity  (WikiText: page; rolling log-likelihood)

Every item is computed, not collected: counting, arithmetic, ordering, letters of words,
continuations of sequences, so each has exactly one right answer. Each task has a ``test``
split (scored) and a ``train`` split (few-shot examples). `write_suite` writes the JSONL
files and the YAMLs (their ``data_files`` absolute) into a directory that lm-eval's
``TaskManager(include_path=...)`` reads; the same YAML shape points at real benchmark files.
"""

from __future__ import annotations

import json
import os
import random

import yaml

WORDS = ["llama", "tensor", "kernel", "batch", "rotary", "camel", "vicuna", "alpaca", "gradient",
         "pipeline", "shard", "token", "matrix", "vector", "socket", "window", "garden", "river",
         "planet", "pencil", "silver", "orange", "castle", "bridge", "forest", "candle"]
TASKS = ("mini_hellaswag", "mini_piqa", "mini_boolq", "mini_arc", "mini_triviaqa",
         "mini_wikitext")
TEST, TRAIN = 80, 20


def _hellaswag(rng: random.Random) -> dict:
    start, step = rng.randint(1, 40), rng.randint(1, 5)
    seq = [start + k * step for k in range(6)]
    ctx = "Counting on: " + ", ".join(map(str, seq[:4])) + ","
    right = f" {seq[4]}, {seq[5]}."
    wrong = set()
    while len(wrong) < 3:
        a, b = rng.randint(1, 80), rng.randint(1, 80)
        if (a, b) != (seq[4], seq[5]):
            wrong.add(f" {a}, {b}.")
    endings = sorted(wrong)
    label = rng.randint(0, 3)
    endings.insert(label, right)
    return {"ctx": ctx, "endings": endings, "label": label}


def _piqa(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    right, wrong = f"write {word[::-1]}", f"write {word}"
    label = rng.randint(0, 1)
    sols = [wrong, right] if label else [right, wrong]
    return {"goal": f"To spell the word {word} backwards,", "sol1": sols[0], "sol2": sols[1],
            "label": label}


def _boolq(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 50), 4)
    probe = rng.choice(numbers) if rng.random() < 0.5 else rng.choice(
        [n for n in range(1, 50) if n not in numbers])
    return {"passage": f"The list holds the numbers {', '.join(map(str, numbers))}.",
            "question": f"is {probe} in the list", "answer": probe in numbers}


def _arc(rng: random.Random) -> dict:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    right = a + b
    options = {right}
    while len(options) < 4:
        options.add(right + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    texts = sorted(str(o) for o in options)
    labels = ["A", "B", "C", "D"]
    return {"question": f"What is {a} plus {b}?",
            "choices": {"text": texts, "label": labels},
            "answerKey": labels[texts.index(str(right))]}


def _triviaqa(rng: random.Random) -> dict:
    kind = rng.randint(0, 2)
    if kind == 0:
        word = rng.choice(WORDS)
        q, a = f"How many letters are in the word {word}", str(len(word))
    elif kind == 1:
        a_, b_ = rng.randint(2, 12), rng.randint(2, 12)
        q, a = f"What is {a_} times {b_}", str(a_ * b_)
    else:
        pair = rng.sample(WORDS, 2)
        q, a = f"Which word comes first alphabetically, {pair[0]} or {pair[1]}", min(pair)
    return {"question": q, "answer": {"value": a, "aliases": [a]}}


def _wikitext(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 6))
    lines = [f"The word {w} has {len(w)} letters and starts with {w[0]}." for w in words]
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    lines.append(f"{a} plus {b} is {a + b}, and {a} times {b} is {a * b}.")
    return {"page": " ".join(lines)}


MAKERS = {"mini_hellaswag": _hellaswag, "mini_piqa": _piqa, "mini_boolq": _boolq,
          "mini_arc": _arc, "mini_triviaqa": _triviaqa, "mini_wikitext": _wikitext}

MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
TASK_FIELDS = {
    "mini_hellaswag": {"output_type": "multiple_choice", "doc_to_text": "{{ctx}}",
                       "doc_to_target": "{{label}}", "doc_to_choice": "{{endings}}",
                       "metric_list": MC_METRICS},
    "mini_piqa": {"output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:",
                  "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}",
                  "metric_list": MC_METRICS},
    "mini_boolq": {"output_type": "multiple_choice",
                   "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                   "doc_to_target": "{{answer | int}}", "doc_to_choice": ["no", "yes"],
                   "metric_list": [MC_METRICS[0]]},
    "mini_arc": {"output_type": "multiple_choice",
                 "doc_to_text": "Question: {{question}}\nAnswer:",
                 "doc_to_target": "{{choices.label.index(answerKey)}}",
                 "doc_to_choice": "{{choices.text}}", "metric_list": MC_METRICS},
    "mini_wikitext": {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                      "doc_to_target": "{{page}}",
                      "metric_list": [{"metric": m} for m in
                                      ("word_perplexity", "byte_perplexity", "bits_per_byte")]},
    "mini_triviaqa": {"output_type": "generate_until",
                      "doc_to_text": "Question: {{question}}?\nAnswer:",
                      "doc_to_target": "{{answer.aliases}}",
                      "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False,
                                            "temperature": 0.0, "max_gen_toks": 8},
                      "target_delimiter": " ",
                      "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                                       "higher_is_better": True, "ignore_case": True,
                                       "ignore_punctuation": True}]},
}


def items(task: str, split: str) -> list[dict]:
    """The deterministic items of one split of one built-in task."""
    rng = random.Random(f"{task}/{split}")
    return [MAKERS[task](rng) for _ in range(TEST if split == "test" else TRAIN)]


def write_suite(directory: str) -> list[str]:
    """Write the built-in tasks (data and YAMLs) under ``directory``; returns task names."""
    os.makedirs(directory, exist_ok=True)
    for task in TASKS:
        files = {}
        for split in ("train", "test"):
            path = os.path.abspath(os.path.join(directory, f"{task}.{split}.jsonl"))
            tmp = f"{path}.{os.getpid()}.tmp"  # ranks may write at once: same bytes
            with open(tmp, "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in items(task, split))
            os.replace(tmp, path)
            files[split] = path
        spec = {"task": task, "tag": ["megatron_llama_suite"], "dataset_path": "json",
                "dataset_kwargs": {"data_files": files}, "training_split": "train",
                "fewshot_split": "train", "test_split": "test", **TASK_FIELDS[task]}
        tmp = os.path.join(directory, f"{task}.yaml.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        os.replace(tmp, os.path.join(directory, f"{task}.yaml"))
    return list(TASKS)
