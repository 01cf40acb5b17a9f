"""What every checkpoint reader offers the writers: Meta-named full tensors, read on demand.

Conversion is hub and spoke: a reader (Meta, Hugging Face, Megatron) presents the checkpoint
as full (unsharded) tensors under Meta's names, and a writer pulls them one at a time, in
``meta_keys`` order (embedding, norm, output, then layer by layer). No reader holds more than
one layer, so memory stays near one output file (or tensor) plus one layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_llama.errors import ConfigError
from megatron_llama.model.canonical import split_dim
from megatron_llama.model.config import LlamaConfig
from megatron_llama.resilience.integrity import verify_folder


def refuse_if_damaged(folder: str) -> None:
    """Verify a training checkpoint's files against the checksums its save recorded (one
    streaming read); a damaged, truncated or missing file is a one-line `ConfigError`."""
    problem = verify_folder(folder)
    if problem:
        raise ConfigError(f"{problem}; refusing to convert it (`pretrain` falls back to the "
                          "previous complete checkpoint)")


class WeightSource:
    """Base of the checkpoint readers. Subclasses set the attributes and `tensor`."""

    config: LlamaConfig
    dtype: torch.dtype
    tokenizer: Optional[str] = None  # path of a tokenizer.model to copy along, if any
    description: str = ""  # e.g. "Meta, 2 shard(s)"

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (e.g. ``layers.3.attention.wq.weight``), fresh memory."""
        raise NotImplementedError

    def part(self, name: str, index: int, count: int, embedding_dim: int = 1) -> torch.Tensor:
        """Piece ``index`` of ``count`` of ``name`` as Meta splits it across shards
        (``embedding_dim``: see `split_dim`).

        Readers that store Meta's shards override this to read only the overlapping inputs.
        """
        full = self.tensor(name)
        dim = split_dim(name, embedding_dim)
        if dim is None or count == 1:
            return full
        return full.chunk(count, dim=dim)[index].clone()

    def close(self) -> None:
        """Release files and process groups the reader holds."""

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
