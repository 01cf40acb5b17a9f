"""Fine-tuning batches: examples with a loss mask, packed into rows, with per-example attention.

An example is ``ids`` (BOS ... EOS) and ``mask`` from `finetune-data`. For training it becomes
``ids[:-1]`` as inputs, ``ids[1:]`` as labels and ``mask[1:]`` as the loss mask (a label is
trained when the token it predicts is a response token), ``len(ids) - 1`` positions.

Packing puts several examples in one row of ``seq_length`` positions (first-fit-decreasing:
longest first, each into the first row with room). Inside a row every example attends only
to itself (a block-diagonal causal mask; on GPUs with Transformer Engine the same boundaries
go to megatron-core as ``PackedSeqParams``), and positions restart at 0 per example. Rotary
embeddings depend only on the distance between positions, so a row's logits equal those of
its examples run one by one; the tests check exactly that, loss and gradients included.
Unpacked rows hold one example each. Padding positions attend only to themselves and are out
of the loss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_llama.data.finetune_data import MASK_SUFFIX
from megatron_llama.errors import ConfigError


class SFTExamples:
    """The token and loss-mask datasets of `finetune-data` at ``prefix``, checked to match."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_llama.data.indexed import check_pair

        for p in (prefix, prefix + MASK_SUFFIX):
            check_pair(p)
        self.prefix = prefix
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(prefix + MASK_SUFFIX)
        self.lengths = np.asarray(self.tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.lengths, np.asarray(self.masks.sequence_lengths)):
            raise ConfigError(f"{prefix}{MASK_SUFFIX}: the loss masks do not match the token "
                              f"documents of {prefix} (written by different runs?)")

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.tokens[i], dtype=np.int64), np.asarray(self.masks[i], dtype=np.int64)


def split_indices(n: int, valid_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, valid) example indices: a seeded random ``valid_fraction`` held out."""
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"validation fraction must be in [0, 1), got {valid_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_valid = int(round(n * valid_fraction))
    return sorted(order[n_valid:].tolist()), sorted(order[:n_valid].tolist())


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) holding at most ``capacity`` each: items by decreasing
    size, each into the first bin with room. A segment tree over the bins' free space finds
    that bin in O(log bins), so 50k examples pack in well under a second."""
    if any(s > capacity for s in sizes):
        raise ConfigError(f"an example of {max(sizes)} positions does not fit a row of "
                          f"{capacity}; rebuild the data with --max-tokens {capacity + 1}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    size = 1
    while size < max(len(sizes), 1):
        size *= 2
    tree = [0] * size + [capacity] * size  # leaf j: free space of bin j (an unused bin: all)
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for item in order:
        need = sizes[item]
        node = 1
        while node < size:  # leftmost leaf with free >= need
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        j = node - size
        while len(bins) <= j:
            bins.append([])
        bins[j].append(item)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return [sorted(b) for b in bins if b]


def plan_rows(examples: SFTExamples, indices: Sequence[int], seq_length: int,
              packed: bool = True) -> list[list[int]]:
    """Rows of example indices: packed (first-fit-decreasing) or one example each."""
    sizes = [int(examples.lengths[i]) - 1 for i in indices]
    if not packed:
        too_long = [s for s in sizes if s > seq_length]
        if too_long:
            raise ConfigError(f"an example of {max(too_long)} positions does not fit "
                              f"seq_length {seq_length}")
        return [[i] for i in indices]
    return [[indices[k] for k in b] for b in first_fit_decreasing(sizes, seq_length)]


def packing_efficiency(examples: SFTExamples, rows: Sequence[Sequence[int]],
                       seq_length: int) -> float:
    """Real positions over row slots (1.0: no padding)."""
    used = sum(int(examples.lengths[i]) - 1 for row in rows for i in row)
    return used / max(1, len(rows) * seq_length)


def row_batch(examples: SFTExamples, rows: Sequence[Sequence[int]], seq_length: int,
              pad_id: int = 0) -> dict:
    """One microbatch of ``len(rows)`` rows: tokens, labels, loss_mask [b, s]; position_ids
    (restarting per example); attention_mask [b, 1, s, s] (True = masked, megatron-core's
    convention); cu_seqlens (example boundaries over the flattened rows, for THD)."""
    b, s = len(rows), seq_length
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.full((b, s), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    positions = np.zeros((b, s), dtype=np.int64)
    segment = np.empty((b, s), dtype=np.int64)
    boundaries = [0]
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            ids, mask = examples.example(i)
            n = len(ids) - 1
            tokens[r, at:at + n] = ids[:-1]
            labels[r, at:at + n] = ids[1:]
            loss_mask[r, at:at + n] = mask[1:]
            positions[r, at:at + n] = np.arange(n)
            segment[r, at:at + n] = k
            at += n
            boundaries.append(r * s + at)
        segment[r, at:] = -1 - np.arange(s - at)  # padding: each position on its own
        positions[r, at:] = np.arange(s - at)
        if at < s:
            boundaries.append((r + 1) * s)
    seg = torch.from_numpy(segment)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    attention_mask = (seg[:, :, None] != seg[:, None, :]) | causal  # [b, s, s]
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(positions),
            "attention_mask": attention_mask[:, None], "cu_seqlens":
            torch.tensor(boundaries, dtype=torch.int32)}


def microbatches(examples: SFTExamples, rows: Sequence[Sequence[int]], seq_length: int,
                 micro_batch: int, pad_id: int = 0, order: Optional[Sequence[int]] = None
                 ) -> list[dict]:
    """``rows`` (in ``order`` if given) as microbatches of ``micro_batch`` rows."""
    order = list(order) if order is not None else list(range(len(rows)))
    return [row_batch(examples, [rows[j] for j in order[k:k + micro_batch]], seq_length, pad_id)
            for k in range(0, len(order), micro_batch)]


class SFTData:
    """Train and validation microbatches of packed fine-tuning rows for this rank, with the
    same interface as `data.batches.TrainData` (the training loop uses either).

    A seeded ``valid_fraction`` of the examples is held out; each split is planned into rows
    once. Train sample k (a row) is row ``perm_e[k mod n]`` of epoch ``e = k // n``, with a
    fresh seeded permutation per epoch, so the order is a pure function of
    ``consumed_samples`` and a resumed run continues exactly. A global batch of G rows is
    split as [microbatch, dp_rank, micro_batch] like pretraining's. Validation uses every
    held-out row, padded with empty rows (no trained tokens) to whole global batches.
    """

    def __init__(self, prefix: str, *, seq_length: int, global_batch: int, micro_batch: int,
                 dp_size: int = 1, dp_rank: int = 0, valid_fraction: float = 0.0,
                 seed: int = 0, packed: bool = True, pad_id: int = 0):
        self.examples = SFTExamples(prefix)
        self.seq_length, self.global_batch, self.micro_batch = seq_length, global_batch, micro_batch
        self.dp_size, self.dp_rank, self.seed, self.pad_id = dp_size, dp_rank, seed, pad_id
        self.num_microbatches = global_batch // (micro_batch * dp_size)
        train, valid = split_indices(len(self.examples), valid_fraction, seed)
        if not train:
            raise ConfigError(f"{prefix}: no training examples left after holding out "
                              f"{valid_fraction:.0%} for validation")
        self.train_rows = plan_rows(self.examples, train, seq_length, packed)
        self.valid_rows = plan_rows(self.examples, valid, seq_length, packed) if valid else []
        self.train_examples, self.valid_examples = len(train), len(valid)
        self.efficiency = packing_efficiency(self.examples, self.train_rows, seq_length)
        self._perm: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perm[epoch] = rng.permutation(len(self.train_rows))
        return self._perm[epoch]

    def _mine(self, rows_of_batch: Sequence[Sequence[int]]) -> list[dict]:
        """This rank's microbatches of one global batch of rows ([micro, dp, micro_batch])."""
        out, per_micro = [], self.micro_batch * self.dp_size
        for m in range(self.num_microbatches):
            first = m * per_micro + self.dp_rank * self.micro_batch
            out.append(row_batch(self.examples, rows_of_batch[first:first + self.micro_batch],
                                 self.seq_length, self.pad_id))
        return out

    def train_batches(self, consumed_samples: int) -> list[dict]:
        """The microbatches of the global batch that starts at row sample ``consumed_samples``."""
        n = len(self.train_rows)
        rows = []
        for k in range(consumed_samples, consumed_samples + self.global_batch):
            rows.append(self.train_rows[int(self._epoch_order(k // n)[k % n])])
        return self._mine(rows)

    def valid_batches(self, eval_iters: int = 0) -> list[list[dict]]:
        """Every held-out row, as whole global batches (``eval_iters`` is not used: the
        split is evaluated completely, so the number means the same at every step)."""
        rows = list(self.valid_rows)
        if not rows:
            return []
        rows += [[]] * (-len(rows) % self.global_batch)
        return [self._mine(rows[k:k + self.global_batch])
                for k in range(0, len(rows), self.global_batch)]

    def describe(self) -> str:
        return (f"{self.train_examples:,} training examples in {len(self.train_rows):,} rows of "
                f"{self.seq_length} (packing efficiency {self.efficiency:.3f}), "
                f"{self.valid_examples:,} held out for validation")
