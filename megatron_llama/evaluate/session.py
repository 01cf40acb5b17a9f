"""One evaluation session: a checkpoint loaded into a TP x PP layout, its tokenizer, and the
`Scorer` every rank runs; greedy generation on top of it.

Launched under torchrun / srun (or `evaluate --nproc-per-node`), the world must be exactly
TP x PP ranks: one model replica, driven by rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_llama.errors import ConfigError


@dataclass
class Session:
    checkpoint: str
    cfg: object
    tokenizer: object
    scorer: object
    tp: int
    pp: int
    is_driver: bool
    _closed: bool = False

    def greedy(self, prompt: Sequence[int], limit: int, until: Sequence[str],
               max_length: int) -> str:
        """Greedy text after ``prompt`` (ids): at most ``limit`` tokens, cut before the first
        stop string in ``until``, ended by EOS (and Llama 3's end-of-turn tokens)."""
        ids, new = list(prompt), []
        stops = set(self.tokenizer.stop_ids)
        text = ""
        while len(new) < limit and len(ids) < max_length:
            nxt = self.scorer.next_tokens([ids])[0]
            if nxt in stops:
                break
            ids.append(nxt)
            new.append(nxt)
            text = self.tokenizer.decode(new)
            cut = [text.index(s) for s in until if s and s in text]
            if cut:
                return text[:min(cut)]
        return text

    def close(self) -> None:
        """Release the followers (rank 0) and the process groups, once."""
        if self._closed:
            return
        self._closed = True
        from megatron_llama.parallel import destroy

        if self.is_driver:
            self.scorer.stop()
        destroy()


def open_session(checkpoint: str, tp: int = 1, pp: int = 1, batch_size: int = 16,
                 tokenizer: Optional[str] = None, dtype: str = "auto") -> Session:
    """Load ``checkpoint`` into a TP x PP layout over this world (collective)."""
    from megatron_llama.convert.load import checkpoint_config, load_into
    from megatron_llama.data.tokenizer import Tokenizer
    from megatron_llama.evaluate.scorer import Scorer
    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.parallel import ParallelLayout, init_distributed, initialize

    cfg, found, source = checkpoint_config(checkpoint)
    tokenizer = tokenizer or found
    if not tokenizer:
        raise ConfigError(f"{checkpoint}: no tokenizer.model with the checkpoint; pass "
                          "tokenizer=PATH (--tokenizer)")
    tok = Tokenizer(tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{tokenizer}: {tok.vocab_size} pieces, more than the model's "
                          f"vocab_size {cfg.vocab_size}")
    rank, world = init_distributed()
    if world != tp * pp:
        raise ConfigError(f"evaluation runs one model replica: the world ({world} ranks) must "
                          f"be TP x PP = {tp * pp}")
    layout = ParallelLayout(tp=tp, pp=pp)
    layout.check(cfg, world)
    if dtype == "auto":
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    initialize(layout)
    tconfig = to_transformer_config(cfg, layout, dtype=dtype)
    chunks = build_model(cfg, tconfig)
    load_into(chunks, cfg, checkpoint, source)
    scorer = Scorer(chunks, cfg, tconfig, batch_size=batch_size)
    return Session(checkpoint, cfg, tok, scorer, tp, pp, is_driver=rank == 0)
