"""Requests per second of the megatron_llama lm-eval backend against lm-eval's `hf` backend,
on the same model and the same requests.

    python tools/eval_speed.py                       # the tiny preset's shape, random weights
    python tools/eval_speed.py --dim 512 --layers 8 --batch-size 32

Builds one random model (Meta format, converted to Hugging Face), writes the built-in suite,
runs its multiple-choice tasks through both backends in this process (TP=1) and times
each backend's `loglikelihood` on the same instances (tokenization, batching, forwards and
scoring; lm-eval's task building and metrics excluded), after a warm-up, the two backends'
passes interleaved; prints requests/s and the ratio. Both get the same --batch-size; how
each batches under it (ours: shorter rows fill the first batch's token count; the output
layer on the scored positions only) is part of what is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(work: str, dim: int, layers: int, vocab: int) -> str:
    import torch

    from megatron_llama.convert.run import convert
    from megatron_llama.data.corpus import pydoc_documents
    from megatron_llama.data.tokenizer import train_tokenizer
    from megatron_llama.model.config import LlamaConfig

    cfg = LlamaConfig(dim=dim, n_layers=layers, n_heads=max(1, dim // 64), vocab_size=vocab,
                      multiple_of=32, max_seq_len=512)
    with open(os.path.join(work, "prose.txt"), "w") as f:
        f.write("\n".join(p["text"] for p in pydoc_documents()))
    tok = train_tokenizer([os.path.join(work, "prose.txt")], os.path.join(work, "tok"),
                          vocab_size=vocab)
    meta = os.path.join(work, "meta")
    os.makedirs(meta)
    g = torch.Generator().manual_seed(0)
    from megatron_llama.model.canonical import full_shape, meta_keys

    weights = {k: torch.randn(full_shape(k, cfg), generator=g) * 0.02 for k in meta_keys(cfg)}
    for k in weights:
        if k.endswith("norm.weight"):
            weights[k] = torch.ones_like(weights[k])
    torch.save(weights, os.path.join(meta, "consolidated.00.pth"))
    cfg.to_params_json(os.path.join(meta, "params.json"))
    shutil.copy(tok, os.path.join(meta, "tokenizer.model"))
    convert(meta, os.path.join(work, "hf"), "hf", progress=False)
    return meta


def requests_of(tasks, manager) -> list:
    """The loglikelihood Instances the suite's multiple-choice tasks send."""
    out = []
    for task in manager.load_task_or_group(list(tasks)).values():
        task.build_all_requests(rank=0, world_size=1)
        out += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return out


def timed(backends: dict, requests, repeats: int) -> dict:
    """Best requests/s of each backend over ``repeats`` passes, the passes interleaved
    (A, B, A, B, ...) so that a slow spell of a shared CPU hits both alike."""
    for lm in backends.values():
        lm.loglikelihood(requests[:32], disable_tqdm=True)  # warm-up
    best = {name: float("inf") for name in backends}
    for _ in range(repeats):
        for name, lm in backends.items():
            start = time.perf_counter()
            lm.loglikelihood(requests, disable_tqdm=True)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(requests) / seconds for name, seconds in best.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256, help="model width (256, the tiny preset's)")
    p.add_argument("--layers", type=int, default=4, help="layers (4, the tiny preset's)")
    p.add_argument("--vocab", type=int, default=8192,
                   help="tokenizer / vocabulary size (8192, the tiny preset's)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size given to both backends (16)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed passes of each backend, interleaved, best kept (5)")
    args = p.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from lm_eval.models.huggingface import HFLM

    from megatron_llama.evaluate.backend import MegatronLlamaLM
    from megatron_llama.evaluate.run import task_manager

    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="eval_speed_")
    try:
        meta = build_model(work, args.dim, args.layers, args.vocab)
        tasks = ("mini_hellaswag", "mini_piqa", "mini_boolq", "mini_arc")
        requests = requests_of(tasks, task_manager((), tasks))
        ours = MegatronLlamaLM(checkpoint=meta, batch_size=args.batch_size)
        hf = HFLM(pretrained=os.path.join(work, "hf"), dtype="float32", device="cpu",
                  batch_size=args.batch_size, add_bos_token=True)
        rates = timed({"ours": ours, "hf": hf}, requests, args.repeats)
        ours.session.close()
        ours_rate, hf_rate = rates["ours"], rates["hf"]
        print(f"{len(requests)} log-likelihood requests (the built-in suite's multiple choice), "
              f"model dim {args.dim} x {args.layers} layers, vocab {args.vocab}, batch "
              f"{args.batch_size}, {torch.get_num_threads()} threads, fp32 CPU")
        print(f"megatron_llama (TP=1): {ours_rate:8.1f} requests/s")
        print(f"lm-eval hf:            {hf_rate:8.1f} requests/s")
        print(f"ratio: {ours_rate / hf_rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
