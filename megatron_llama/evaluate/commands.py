"""`megatron-llama evaluate` and `megatron-llama lm-eval` (lm-eval's own CLI, with the
megatron_llama backend registered)."""

from __future__ import annotations

import argparse
import sys

from megatron_llama.errors import ConfigError


def _task_list(values) -> list[str]:
    from megatron_llama.evaluate.suite import TASKS

    out: list[str] = []
    for v in values or []:
        for name in v.split(","):
            name = name.strip()
            if name == "suite":
                out += [t for t in TASKS if t not in out]
            elif name and name not in out:
                out.append(name)
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from megatron_llama.local_ranks import run_cli_ranks, under_launcher

    tasks = _task_list(args.tasks)
    if args.list_tasks:
        from megatron_llama.evaluate.run import task_manager

        manager = task_manager(args.include_path or [], [] if not args.include_path else None)
        names = manager.all_tasks
        print("\n".join(n for n in names if n.startswith("mini_")) if not args.include_path
              else "\n".join(names))
        return 0
    if not args.checkpoint:
        raise ConfigError("pass --checkpoint DIR (a Meta, Hugging Face or megatron-llama "
                          "checkpoint)")
    if not tasks and not args.perplexity:
        raise ConfigError("pass --tasks (e.g. --tasks suite, or lm-eval task names) and/or "
                          "--perplexity DATA")
    world = args.tp * args.pp
    if args.nproc_per_node and args.nproc_per_node > 1 and not under_launcher():
        if args.nproc_per_node != world:
            raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: evaluation runs one "
                              f"replica on TP x PP = {world} ranks")
        from megatron_llama.convert.load import checkpoint_config
        from megatron_llama.evaluate.run import check_tasks, task_manager

        checkpoint_config(args.checkpoint)  # a bad checkpoint or task: one line, no ranks
        if tasks:
            check_tasks(task_manager(args.include_path or [], tasks), tasks, args.online)
        return run_cli_ranks(args.nproc_per_node, sys.argv[1:])
    from megatron_llama.evaluate.run import evaluate
    from megatron_llama.fileio import write_json

    out = evaluate(args.checkpoint, tasks, tp=args.tp, pp=args.pp,
                   num_fewshot=args.num_fewshot, limit=args.limit,
                   batch_size=args.batch_size, tokenizer=args.tokenizer,
                   include_paths=args.include_path or [], online=args.online,
                   perplexity_data=args.perplexity, perplexity_samples=args.perplexity_samples,
                   seed=args.seed)
    if out is None:
        return 0
    print(out["table"])
    record = {"checkpoint": args.checkpoint, "tasks": tasks, "num_fewshot": args.num_fewshot,
              "limit": args.limit, "layout": {"tp": args.tp, "pp": args.pp},
              "results": out["rows"]}
    if args.log_samples:
        record["samples"] = {
            task: [{"doc_id": s["doc_id"], "target": s["target"],
                    "arguments": [list(a) for a in s["arguments"]],
                    "resps": s["filtered_resps"]} for s in samples]
            for task, samples in (out["results"].get("samples") or {}).items()}
    print(f"wrote {write_json(record, args.output)}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import megatron_llama.evaluate.backend  # noqa: F401 - registers "megatron_llama"
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args.lm_eval_args]
    cli_evaluate()
    return 0


def add_command(subparsers) -> None:
    """Register `evaluate` and `lm-eval`."""
    p = subparsers.add_parser(
        "evaluate", help="zero/few-shot tasks (lm-eval) scored as the paper scores them",
        description="Evaluate any checkpoint (Meta, Hugging Face, megatron-llama, a LoRA "
        "run) at any TP x PP layout with lm-evaluation-harness tasks through the "
        "megatron_llama backend. Multiple-choice tasks also get acc_paper: the LLaMA paper's "
        "rule (likelihood per character; BoolQ and OpenBookQA relative to \"Answer:\"). "
        "Offline by default; --tasks suite runs the built-in tasks (no download). Writes "
        "one JSON of results and prints a table beside the paper's numbers.")
    p.add_argument("--checkpoint", required=False, help="checkpoint directory (any format)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="lm-eval task names, comma or space separated; 'suite' = the built-in "
                        "mini_hellaswag, mini_piqa, mini_boolq, mini_arc, mini_triviaqa, "
                        "mini_wikitext")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="examples in each prompt (default: the task's, zero-shot for the "
                        "built-in suite)")
    p.add_argument("--limit", type=float, default=None,
                   help="items per task (a fraction if < 1; default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward (16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks (1)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start TP x PP local processes (when not under torchrun/srun)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model (default: the checkpoint's own)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a directory (or YAML) of more lm-eval tasks, e.g. the real "
                        "benchmarks pointed at local files; repeatable")
    p.add_argument("--online", action="store_true",
                   help="let tasks download their datasets from the Hugging Face Hub")
    p.add_argument("--perplexity", default=None, metavar="DATA",
                   help="also the perplexity on the validation split pretrain builds from "
                        "DATA (a dataset prefix or blend YAML)")
    p.add_argument("--perplexity-samples", type=int, default=64,
                   help="validation sequences for --perplexity (64)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (1234)")
    p.add_argument("--output", default="results.json", help="results JSON (results.json)")
    p.add_argument("--log-samples", action="store_true",
                   help="also every request's log-likelihoods in the JSON")
    p.add_argument("--list-tasks", action="store_true",
                   help="list the built-in tasks (with --include-path: every task) and exit")
    p.set_defaults(func=cmd_evaluate)

    lm = subparsers.add_parser(
        "lm-eval", help="lm-evaluation-harness's own CLI with --model megatron_llama",
        description="lm-eval's command line as it is (`lm_eval ...`), with the "
        "megatron_llama model imported first: megatron-llama lm-eval run --model "
        "megatron_llama --model_args checkpoint=DIR,tp=1 --tasks hellaswag. An installed "
        "megatron_llama also registers the model for the stock `lm_eval` command (its "
        ".pth hook); this one also works when the package is only on PYTHONPATH.")
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's arguments")
    lm.set_defaults(func=cmd_lm_eval)
