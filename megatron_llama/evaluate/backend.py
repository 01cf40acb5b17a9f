"""The lm-evaluation-harness model backend ``megatron_llama``.

    command line:          lm_eval --model megatron_llama --model_args checkpoint=DIR \\
                               --tasks hellaswag        (under torchrun for tp=/pp= > 1)
    lm-eval's Python API:  import megatron_llama.evaluate.backend  (registers the name), then
                           lm_eval.simple_evaluate(model="megatron_llama",
                                                   model_args="checkpoint=DIR,tp=2", ...)

The stock `lm_eval` finds the name through the package's ``lm_eval.models`` entry point
(`megatron_llama_lm_eval_hook.py`); `megatron-llama lm-eval` is the same CLI for a package
only on PYTHONPATH.

`MegatronLlamaLM` is an lm-eval `TemplateLM`: lm-eval tokenizes context/continuation pairs
through `tok_encode` and hands token rows to `_loglikelihood_tokens`; rolling
log-likelihoods (perplexity tasks) and greedy generation with stop strings are built on
the same scoring. The model is any checkpoint (Meta, Hugging Face, megatron-llama, a LoRA
run; any generation) loaded into a TP x PP layout; under torchrun every rank builds the
backend, rank 0 returns to lm-eval and the others serve its forwards until it exits
(`evaluate.scorer`).

Tokens as lm-eval's `hf` backend produces them with ``add_bos_token=True``: BOS before every
context (LLaMA saw BOS at the start of each document in pretraining), no EOS; an empty
context is BOS alone.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("megatron_llama")
class MegatronLlamaLM(TemplateLM):
    """lm-eval's view of a megatron-llama model (see the module doc)."""

    def __init__(self, checkpoint: str, tp: int = 1, pp: int = 1, batch_size=16,
                 max_length: Optional[int] = None, add_bos_token=True,
                 tokenizer: Optional[str] = None, max_gen_toks: int = 256, dtype: str = "auto",
                 **kwargs):
        super().__init__()
        from megatron_llama.evaluate.session import open_session

        self.session = open_session(checkpoint, tp=int(tp), pp=int(pp),
                                    batch_size=int(batch_size) if str(batch_size).isdigit()
                                    else 16, tokenizer=tokenizer, dtype=dtype)
        self.tok = self.session.tokenizer
        self.cfg = self.session.cfg
        self.add_bos = _flag(add_bos_token)
        self.max_length = int(max_length) if max_length else self.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self._encoded: dict[str, list[int]] = {}  # text -> ids, filled by `loglikelihood`
        if not self.session.is_driver:  # follow rank 0's forwards, then leave with it
            self.session.scorer.serve()
            self.session.close()
            sys.exit(0)
        atexit.register(self.session.close)

    # ---- tokens ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.add_bos else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs):
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        ids = self._encoded.get(string)
        if ids is None:
            return self.tok.encode(string, bos=bos)
        return ([self.tok.bos_id] if bos else []) + ids

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """lm-eval's own pairing of context and continuation (`TemplateLM.loglikelihood`),
        with every distinct string it will encode tokenized up front in one batched call
        (the tokenizer's native loop, over the CPU's threads) instead of one call each;
        the choices of a question share their context, so most strings repeat."""
        texts = set()
        for context, continuation in (r.args for r in requests):
            if context == "":
                texts.add(continuation)
                continue
            stem = context.rstrip()  # TemplateLM moves trailing spaces to the continuation
            texts.update((stem, context + continuation))
        texts = sorted(texts)
        threads = max(1, min(8, os.cpu_count() or 1))
        self._encoded = dict(zip(texts, self.tok.encode_batch(texts, num_threads=threads)))
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._encoded = {}

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # ---- scoring -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        bar = tqdm(total=len(rows), desc="log-likelihoods", disable=disable_tqdm)
        results = self.session.scorer.score(rows, progress=bar)
        bar.close()
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text)  # as lm-eval's hf backend: BOS if add_bos_token
            for pair in get_rolling_token_windows(tokens, self.prefix_token_id,
                                                  self.max_length, 1):
                ctx, cont = make_disjoint_window(pair)
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, scores):
            totals[k] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy continuations, cut at the first stop string (``until``) or EOS."""
        out = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("megatron_llama generates greedily: drop do_sample/"
                                 "temperature from gen_kwargs")
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context)[-(self.max_length - 1):]
            text = self.session.greedy(prompt, limit, until, self.max_length)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.cfg.num_params(),
                "model_checkpoint": os.path.abspath(self.session.checkpoint),
                "layout": {"tp": self.session.tp, "pp": self.session.pp}}
