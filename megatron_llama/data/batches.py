"""Batches for the training loop: megatron-core GPTDatasets from a blend, or synthetic tokens.

Sample order is a pure function of ``consumed_samples``: global batch k holds samples
[k*G, (k+1)*G) of the train dataset, split into microbatches and data-parallel ranks as
[microbatch, dp_rank, micro_batch]. Resuming from ``consumed_samples`` therefore continues
with exactly the next samples, in any layout with the same global batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_llama.errors import ConfigError


class SyntheticTokens:
    """Deterministic random token sequences (benchmarks, tests): sample i from seed + i."""

    def __init__(self, vocab_size: int, seq_length: int, size: int, seed: int = 0):
        self.vocab_size, self.seq_length, self.size, self.seed = vocab_size, seq_length, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {"tokens": x[:-1], "labels": x[1:]}


class TrainData:
    """Train and validation batches for this rank."""

    def __init__(self, train, valid, global_batch: int, micro_batch: int, dp_size: int,
                 dp_rank: int):
        self.train, self.valid = train, valid
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.num_microbatches = global_batch // (micro_batch * dp_size)

    def _batches(self, dataset, start: int) -> list[dict]:
        out = []
        per_micro = self.micro_batch * self.dp_size
        for m in range(self.num_microbatches):
            first = start + m * per_micro + self.dp_rank * self.micro_batch
            samples = [dataset[(first + j) % len(dataset)] for j in range(self.micro_batch)]
            out.append({"tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]),
                        "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples])})
        return out

    def train_batches(self, consumed_samples: int) -> list[dict]:
        """The microbatches of the global batch that starts at ``consumed_samples``."""
        return self._batches(self.train, consumed_samples)

    def valid_batches(self, eval_iters: int) -> list[list[dict]]:
        """The same ``eval_iters`` global batches of the validation set at every evaluation."""
        if self.valid is None or len(self.valid) == 0:
            return []
        return [self._batches(self.valid, i * self.global_batch) for i in range(eval_iters)]


def build_train_data(cfg, dp_size: int, dp_rank: int, vocab_size: int,
                     eod: Optional[int]) -> TrainData:
    """TrainData from ``cfg.data_blend`` (megatron-core datasets) or synthetic tokens."""
    samples = cfg.train_steps * cfg.global_batch
    valid_samples = cfg.eval_iters * cfg.global_batch if cfg.eval_interval else 0
    if cfg.data_blend is None:
        train = SyntheticTokens(vocab_size, cfg.seq_length, samples, cfg.seed)
        valid = SyntheticTokens(vocab_size, cfg.seq_length, valid_samples, cfg.seed + 1)
    else:
        from megatron_llama.data.blend import build_gpt_datasets, resolve_data

        if eod is None:
            raise ConfigError("training on a data blend needs --tokenizer (for the EOS id)")
        train, valid, _ = build_gpt_datasets(
            resolve_data(cfg.data_blend), vocab_size=vocab_size, eod=eod,
            seq_length=cfg.seq_length, samples=(samples, max(valid_samples, 1), 0),
            seed=cfg.seed, cache_dir=_cache_dir(cfg))
    return TrainData(train, valid, cfg.global_batch, cfg.micro_batch, dp_size, dp_rank)


def _cache_dir(cfg) -> Optional[str]:
    import os

    if cfg.save_dir:
        return os.path.join(cfg.save_dir, "data_cache")
    return None
