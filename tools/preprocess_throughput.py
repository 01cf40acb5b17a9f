"""Preprocessing throughput next to raw SentencePiece encoding, same input and worker count.

    python tools/preprocess_throughput.py [--input F.jsonl ...] [--tokenizer M] [--workers N]

Without --input it builds the built-in corpus (stdlib code, 8 MiB) and a 32000-piece
tokenizer in a temporary directory. "raw" is SentencePiece's own multi-threaded batch
encoder on texts already in memory (no reading, parsing or writing): the ceiling. The goal
is preprocessing at >= 0.8x of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="*", help=".jsonl/.txt inputs (default: built-in corpus)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: train one)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    args = parser.parse_args()

    from megatron_llama.data.corpus import build_builtin_corpus
    from megatron_llama.data.preprocess import preprocess
    from megatron_llama.data.sources import iter_documents
    from megatron_llama.data.tokenizer import Tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        inputs = args.input or [build_builtin_corpus(tmp)["code"]]
        model = args.tokenizer or train_tokenizer(inputs, os.path.join(tmp, "tok"), 32000)
        tok = Tokenizer(model)
        texts = [d.text for d in iter_documents(inputs)]
        size = sum(os.path.getsize(p) for p in inputs)

        raw_best = 0.0
        for _ in range(args.repeat):
            start = time.perf_counter()
            tokens = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=args.workers))
            raw_best = max(raw_best, tokens / (time.perf_counter() - start))
        pre_best = 0.0
        for _ in range(args.repeat):
            stats = preprocess(inputs, os.path.join(tmp, "out"), model, workers=args.workers,
                               progress=False)
            pre_best = max(pre_best, stats.tokens / stats.seconds)
    print(json.dumps({"input_bytes": size, "documents": len(texts), "workers": args.workers,
                      "vocab": tok.vocab_size}))
    print(f"raw SentencePiece encode : {raw_best:>12,.0f} tokens/s")
    print(f"megatron-llama preprocess: {pre_best:>12,.0f} tokens/s  "
          f"(read + parse + encode + write; {pre_best / raw_best:.2f}x of raw)")


if __name__ == "__main__":
    main()
