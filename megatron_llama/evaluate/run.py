"""`megatron-llama evaluate`: lm-eval tasks through the megatron_llama backend, the paper's
multiple-choice scoring beside lm-eval's metrics, perplexity on a held-out dataset, one
JSON of results and a table beside the paper's numbers.

Offline by default (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``): the built-in suite
(`evaluate.suite`) and any local task YAMLs (``--include-path``) need no network; a task whose
data lives on the Hugging Face Hub is refused in one line unless ``--online``.
"""

from __future__ import annotations

import difflib
import math
import os
from collections import namedtuple
from typing import Optional, Sequence

from megatron_llama.errors import ConfigError
from megatron_llama.evaluate.paper import (
    answer_context_requests,
    paper_choice,
    paper_number,
    uses_answer_context,
)

LOCAL_FORMATS = ("json", "csv", "parquet", "text", "arrow")
# what a task YAML must define for its output type (lm-eval fails late, without the file)
REQUIRED_FIELDS = {"multiple_choice": ("doc_to_text", "doc_to_target", "doc_to_choice"),
                   "generate_until": ("doc_to_text", "doc_to_target"),
                   "loglikelihood": ("doc_to_text", "doc_to_target"),
                   "loglikelihood_rolling": ("doc_to_target",)}
_Request = namedtuple("_Request", "args")


def suite_dir() -> str:
    """Where the built-in suite is written (once per user; rewritten when missing)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "megatron_llama", "eval_suite")


def task_manager(include_paths: Sequence[str] = (), tasks: Optional[Sequence[str]] = None):
    """lm-eval's TaskManager over the built-in suite, ``include_paths`` and lm-eval's own
    tasks; without the latter (indexing its ~15k YAMLs takes seconds) when ``tasks`` are
    all found in the first two."""
    from lm_eval.tasks import TaskManager

    from megatron_llama.evaluate.suite import write_suite

    for path in include_paths:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: --include-path not found")
    write_suite(suite_dir())
    paths = [suite_dir(), *include_paths]
    if tasks is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        missing = [t for t in tasks if t not in local.task_index]
        # all found, or misspelt local names (the error can say which): no need for the rest
        if all(difflib.get_close_matches(t, local.all_tasks, n=1, cutoff=0.85)
               for t in missing):
            return local
    return TaskManager(include_path=paths)


def check_tasks(manager, tasks: Sequence[str], online: bool) -> None:
    """One line for an unknown task, or a Hub dataset while offline; builds the tasks once
    so a task file with a missing field is reported (with its file) before the model loads."""
    for name in tasks:
        entry = manager.task_index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown task {name!r}{hint} (`megatron-llama evaluate "
                              "--list-tasks` lists them; local YAMLs: --include-path)")
        cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
        if cfg.get("task") == name and "class" not in cfg:  # a YAML task (not a Python one)
            kind = cfg.get("output_type", "generate_until")
            missing = [f for f in ("dataset_path",) + REQUIRED_FIELDS.get(kind, ())
                       if cfg.get(f) is None and not (f == "doc_to_text" and "doc_to_text" in cfg)]
            if kind not in REQUIRED_FIELDS:
                raise ConfigError(f"{entry.yaml_path or name}: task {name}: output_type {kind!r} "
                                  f"is not one of {', '.join(REQUIRED_FIELDS)}")
            if missing:
                raise ConfigError(f"{entry.yaml_path or name}: task {name} has no "
                                  f"{', '.join(missing)} (needed for output_type {kind})")
        path = cfg.get("dataset_path")
        if (not online and path and path not in LOCAL_FORMATS and not os.path.exists(path)):
            raise ConfigError(f"{entry.yaml_path or name}: task {name} reads dataset {path!r} "
                              "from the Hugging Face Hub, and evaluation is offline; pass "
                              "--online, or point dataset_path/data_files at local files")
    try:
        manager.load_task_or_group(list(tasks))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval raises many kinds for a bad task file
        where = ", ".join(str(manager.task_index[t].yaml_path) for t in tasks
                          if manager.task_index[t].yaml_path)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where or tasks}: task does not build ({message})") from None


def paper_scores(lm, results: dict) -> dict[str, tuple[float, int]]:
    """{task: (accuracy by the paper's rule, n)} for every multiple-choice task."""
    pending, per_task = [], {}
    for task, samples in (results.get("samples") or {}).items():
        if results["configs"][task].get("output_type") != "multiple_choice":
            continue
        per_task[task] = samples
        if uses_answer_context(task):
            for s in samples:
                pending += answer_context_requests([c for _, c in s["arguments"]])
    answer_ll = iter([ll for ll, _ in lm.loglikelihood([_Request(p) for p in pending])]
                     if pending else [])
    out = {}
    for task, samples in per_task.items():
        right, scored = 0, True
        for s in samples:
            conts = [c for _, c in s["arguments"]]
            lls = [r[0] for r in s["filtered_resps"]]
            answer = [next(answer_ll) for _ in conts] if uses_answer_context(task) else None
            choices = [c[1:] if c.startswith(" ") else c for c in conts]
            gold = gold_index(s["target"], choices)
            scored = scored and gold is not None
            if gold is not None:
                right += paper_choice(task, lls, choices, answer) == gold
        if scored:  # tasks whose gold answer is not a choice index (e.g. WinoGrande's
            out[task] = (right / max(1, len(samples)), len(samples))  # contexts) get none
    return out


def gold_index(target, choices: Sequence[str]) -> Optional[int]:
    """The gold choice's index from a logged target: an index, or one choice's text."""
    if isinstance(target, (list, tuple)):
        target = target[0] if len(target) == 1 else None
    if isinstance(target, bool):
        return int(target)
    if isinstance(target, int):
        return target if 0 <= target < len(choices) else None
    if isinstance(target, str):
        if target.strip().lstrip("-").isdigit():
            index = int(target)
            return index if 0 <= index < len(choices) else None
        text = target.strip()
        return next((i for i, c in enumerate(choices) if c.strip() == text), None)
    return None


def result_rows(results: dict, paper: dict, preset: Optional[str]) -> list[dict]:
    """[{task, metric, value, n, stderr, paper}] from lm-eval's results and ours."""
    rows = []
    for task, metrics in results["results"].items():
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "value": float(value), "n": n,
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "paper": None})
        if task in paper:
            acc, count = paper[task]
            reference = paper_number(preset, task)
            rows.append({"task": task, "metric": "acc_paper", "value": acc, "n": count,
                         "stderr": math.sqrt(acc * (1 - acc) / max(1, count - 1)),
                         "paper": reference / 100 if reference is not None else None})
    return rows


def format_table(rows: list[dict], preset: Optional[str]) -> str:
    head = (f"{'task':<18} {'metric':<16} {'value':>12} {'stderr':>8} {'n':>6}  "
            f"paper ({preset or '-'})")
    lines = [head, "-" * len(head)]
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        paper = f"{r['paper']:.3f}" if r["paper"] is not None else ""
        lines.append(f"{r['task']:<18} {r['metric']:<16} {r['value']:>12.4f} {stderr:>8} "
                     f"{r['n'] if r['n'] is not None else '-':>6}  {paper}")
    lines.append("acc_paper: the LLaMA paper's rule (likelihood per character; BoolQ and "
                 "OpenBookQA: relative to \"Answer:\")")
    return "\n".join(lines)


def perplexity_rows(data: str, tokenizer, seq_length: int, samples: int, seed: int = 1234
                    ) -> list[tuple[list[int], int]]:
    """Scoring rows of the validation split `pretrain` builds from ``data`` (a prefix or a
    blend): ``samples`` sequences of ``seq_length`` tokens, every token after the first
    scored. Collective (megatron-core's dataset builder): every rank calls it."""
    import hashlib

    from megatron_llama.data.blend import build_gpt_datasets, resolve_data

    # megatron-core caches sample indices (rank 0 writes, the others read: one path for all);
    # kept out of the user's data directory
    key = hashlib.sha1(os.path.abspath(data).encode()).hexdigest()[:16]
    cache = os.path.join(os.path.dirname(suite_dir()), "eval_cache", key)
    _, valid, _ = build_gpt_datasets(resolve_data(data), vocab_size=tokenizer.vocab_size,
                                     eod=tokenizer.eos_id, seq_length=seq_length,
                                     samples=(1, samples, 0), seed=seed, cache_dir=cache)
    if valid is None or len(valid) == 0:
        raise ConfigError(f"{data}: no validation split (its blend's split gives it none)")
    rows = []
    for i in range(min(samples, len(valid))):
        s = valid[i]
        ids = list(map(int, s["tokens"])) + [int(s["labels"][-1])]
        rows.append((ids, len(ids) - 1))
    return rows


def evaluate(checkpoint: str, tasks: Sequence[str], *, tp: int = 1, pp: int = 1,
             num_fewshot: Optional[int] = None, limit: Optional[float] = None,
             batch_size: int = 16, tokenizer: Optional[str] = None,
             include_paths: Sequence[str] = (), online: bool = False,
             perplexity_data: Optional[str] = None, perplexity_samples: int = 64,
             seed: int = 1234) -> Optional[dict]:
    """Run the evaluation on every rank; rank 0 returns {"rows", "table", "results"}; the
    other ranks serve rank 0's forwards and exit the process (status 0) when it is done."""
    if not online:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    from megatron_llama.evaluate.backend import MegatronLlamaLM
    from megatron_llama.model.presets import preset_of

    manager = task_manager(include_paths, tasks) if tasks else None
    if tasks:
        check_tasks(manager, tasks, online)
    ppl_rows = None
    if perplexity_data:
        from megatron_llama.convert.load import checkpoint_config
        from megatron_llama.data.tokenizer import Tokenizer

        cfg, found, _ = checkpoint_config(checkpoint)
        tok = Tokenizer(tokenizer or found) if (tokenizer or found) else None
        if tok is None:
            raise ConfigError(f"{checkpoint}: no tokenizer.model with the checkpoint; pass "
                              "--tokenizer")
        from megatron_llama.parallel import init_distributed

        init_distributed()
        ppl_rows = perplexity_rows(perplexity_data, tok, cfg.max_seq_len, perplexity_samples,
                                   seed)
    lm = MegatronLlamaLM(checkpoint=checkpoint, tp=tp, pp=pp, batch_size=batch_size,
                         tokenizer=tokenizer)  # other ranks serve inside, then exit
    try:
        results = {"results": {}, "samples": {}, "configs": {}, "n-samples": {}}
        if tasks:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks),
                                              num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, log_samples=True,
                                              random_seed=seed, numpy_random_seed=seed,
                                              torch_random_seed=seed, fewshot_random_seed=seed)
        preset = preset_of(lm.cfg)
        preset_name = preset.name if preset else None
        rows = result_rows(results, paper_scores(lm, results), preset_name)
        if ppl_rows is not None:
            from tqdm import tqdm

            bar = tqdm(total=len(ppl_rows), desc="perplexity")
            scores = lm.session.scorer.score(ppl_rows, progress=bar)
            bar.close()
            tokens = sum(n for _, n in ppl_rows)
            nll = -sum(lp for lp, _ in scores) / tokens
            rows.append({"task": f"perplexity:{os.path.basename(perplexity_data)}",
                         "metric": "perplexity", "value": math.exp(min(nll, 50.0)),
                         "n": len(ppl_rows), "stderr": None, "paper": None})
            rows.append({"task": f"perplexity:{os.path.basename(perplexity_data)}",
                         "metric": "loss", "value": nll, "n": tokens, "stderr": None,
                         "paper": None})
        return {"rows": rows, "table": format_table(rows, preset_name), "results": results}
    finally:
        lm.session.close()
