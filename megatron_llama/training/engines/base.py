"""The one interface the training loop drives, and the loss both engines train.

An `Engine` owns everything between "here are this step's microbatches" and "the weights are
updated": gradient reduction, the optimizer (it builds its own), the lr schedule, and its
checkpoint format. The loop (`training.loop`) knows only this interface; the engines know
nothing of the loop.
"""

from __future__ import annotations

import abc
from typing import Optional

import torch


class Engine(abc.ABC):
    """One training run's step, evaluation and checkpoints (see the module doc)."""

    name: str = ""

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse, with one `ConfigError` line, a `TrainConfig` this engine cannot run.
        Called before any process group or weight exists."""

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate of the last update (the first one's before any)."""

    @abc.abstractmethod
    def forward_backward(self, microbatches: list[dict], poison: bool = False) -> list:
        """Forward and backward over this rank's microbatches of one global batch.

        Each microbatch is ``{"tokens": LongTensor[b, s], "labels": LongTensor[b, s]}``.
        Returns the per-microbatch mean losses (empty on ranks without the loss: pipeline
        stages before the last). ``poison`` makes the loss NaN (fault injection)."""

    @abc.abstractmethod
    def step(self, update_number: int) -> Optional[float]:
        """Apply update number ``update_number`` (from 1) at the recipe's lr for it;
        returns the gradient norm before clipping (None if the engine does not know it)."""

    @abc.abstractmethod
    def skip(self) -> None:
        """End the step without an update (the loss was not finite)."""

    @abc.abstractmethod
    def evaluate(self, batches: list[list[dict]]) -> list:
        """Forward-only losses over validation global batches (lists of microbatches)."""

    @abc.abstractmethod
    def save(self, root: str, iteration: int, train_state: dict, metadata: dict) -> None:
        """Write a checkpoint of ``iteration`` under ``root`` (collective): complete on
        return, or, with ``--async-save``, being written until `finish_saves` commits it."""

    def finish_saves(self, blocking: bool) -> Optional[int]:
        """Collective: commit an asynchronous save whose files are written (wait for it when
        ``blocking``); returns its iteration once committed, else None. Engines that save
        synchronously have nothing to do."""
        return None

    @abc.abstractmethod
    def load(self, root: str, expected_model: Optional[dict]) -> Optional[dict]:
        """Resume from the latest checkpoint under ``root``: the saved train state, or None
        when there is none (or only model weights to start from). A checkpoint of another
        model (``expected_model``: params.json fields) is refused with one line."""

    def describe(self) -> str:
        """A few words for the start-of-run line."""
        return self.name


def lm_loss(per_token_loss: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
            poison: bool = False):
    """Mean next-token loss of one microbatch, as megatron-core's schedules expect it.

    ``poison`` turns the loss (and so every gradient) into NaN: fault injection for tests.
    """
    per_token_loss = per_token_loss.float()
    if poison:
        per_token_loss = per_token_loss * float("nan")
    if loss_mask is None:
        loss = per_token_loss.mean()
    else:
        mask = loss_mask.float()
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: the schedule divides the returned loss in place by the number of microbatches
    return loss, {"lm loss": loss.detach().clone()}


def on_model_device(batch: dict, model) -> dict:
    """The microbatch's tensors on the device of ``model``'s parameters (batches are built
    on the host; on GPUs they are copied over asynchronously, on CPU nothing moves)."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}

