"""Preprocessing throughput next to the raw tokenizer library, same input and worker count.

    python tools/preprocess_throughput.py [--kind sentencepiece|tiktoken] [--input F.jsonl ...]
                                          [--tokenizer M] [--workers N]

Without --input it builds the built-in corpus (stdlib code, 32 MiB); without --tokenizer it
trains a 32000-token one of --kind in a temporary directory (tiktoken: a Llama 3-style BPE
rank file). "raw" is the library's own multi-threaded batch encoder on texts already in
memory (no reading, parsing or writing): SentencePiece's ``encode`` or tiktoken's
``encode_ordinary_batch`` on an Encoding loaded by tiktoken's own ``load_tiktoken_bpe``.
That is the ceiling; the goal is preprocessing at >= 0.8x of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # training, then forking workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="*", help=".jsonl/.txt inputs (default: built-in corpus)")
    parser.add_argument("--kind", choices=["sentencepiece", "tiktoken"], default="sentencepiece",
                        help="tokenizer to train when --tokenizer is not given")
    parser.add_argument("--tokenizer", help="tokenizer.model of either kind (default: train one)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--corpus-mb", type=int, default=32,
                        help="size of the built-in corpus without --input (MiB; 32: enough "
                             "that starting the workers and loading the tokenizer amortise)")
    args = parser.parse_args()

    from megatron_llama.data.corpus import build_builtin_corpus
    from megatron_llama.data.preprocess import preprocess
    from megatron_llama.data.sources import iter_documents
    from megatron_llama.data.tokenizer import Tokenizer, train_tiktoken_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        inputs = args.input or [build_builtin_corpus(tmp, max_code_bytes=args.corpus_mb << 20)["code"]]
        if args.tokenizer:
            model = args.tokenizer
        elif args.kind == "tiktoken":
            model = train_tiktoken_tokenizer(inputs, os.path.join(tmp, "tok.model"), 32000)
        else:
            model = train_tokenizer(inputs, os.path.join(tmp, "tok"), 32000)
        tok = Tokenizer(model)
        texts = [d.text for d in iter_documents(inputs)]
        size = sum(os.path.getsize(p) for p in inputs)
        raw_encode = _raw_encoder(tok, model, args.workers)

        raw_best = 0.0
        for _ in range(args.repeat):
            start = time.perf_counter()
            tokens = sum(len(ids) for ids in raw_encode(texts))
            raw_best = max(raw_best, tokens / (time.perf_counter() - start))
        pre_best = 0.0
        for _ in range(args.repeat):
            stats = preprocess(inputs, os.path.join(tmp, "out"), model, workers=args.workers,
                               progress=False)
            pre_best = max(pre_best, stats.tokens / stats.seconds)
    print(json.dumps({"input_bytes": size, "documents": len(texts), "workers": args.workers,
                      "kind": tok.kind, "vocab": tok.vocab_size}))
    print(f"raw {tok.kind + ' encode':<21}: {raw_best:>12,.0f} tokens/s")
    print(f"megatron-llama preprocess: {pre_best:>12,.0f} tokens/s  "
          f"(read + parse + encode + write; {pre_best / raw_best:.2f}x of raw)")


def _raw_encoder(tok, model: str, workers: int):
    """The library's own batch encoder for ``model``, with ``workers`` threads."""
    if tok.kind == "tiktoken":
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        from megatron_llama.data.tiktoken_bpe import SPLIT_PATTERN

        enc = tiktoken.Encoding("raw", pat_str=SPLIT_PATTERN,
                                mergeable_ranks=load_tiktoken_bpe(model), special_tokens={})
        return lambda texts: enc.encode_ordinary_batch(texts, num_threads=workers)
    return lambda texts: tok.encode_batch(texts, num_threads=workers)


if __name__ == "__main__":
    main()
