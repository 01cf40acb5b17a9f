"""Where the files of a training checkpoint are: the layout both engines write and `convert`,
`generate` and resuming read. File names only; no torch, no megatron-core, no DeepSpeed.

megatron-core engine (dist_checkpointing)::

    <root>/latest_checkpointed_iteration.txt   the iteration of the latest complete checkpoint
    <root>/iter_0000100/                        megatron-core's files (.metadata, *.distcp)
    <root>/iter_0000100/megatron_llama.json     model config (Meta's names), layout, dtype

DeepSpeed engine::

    <root>/latest                               the tag of the latest complete checkpoint
    <root>/iter_0000100/                        DeepSpeed's model and ZeRO optimizer files
    <root>/iter_0000100/megatron_llama.json     as above, plus the ZeRO stage

The pointer file (tracker or ``latest``) is always written last, so it names only complete
checkpoints.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from megatron_llama.errors import ConfigError, read_json_object

TRACKER = "latest_checkpointed_iteration.txt"   # megatron-core engine's pointer
DEEPSPEED_LATEST = "latest"                       # DeepSpeed engine's pointer
METADATA = "megatron_llama.json"                  # our metadata, in every checkpoint folder
TAG_PREFIX = "iter_"
DEEPSPEED_OPTIM_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def iteration_tag(iteration: int) -> str:
    """The folder name of a checkpoint: ``iter_0000100``."""
    return f"{TAG_PREFIX}{iteration:07d}"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_tag(iteration))


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit() or not os.path.isdir(iteration_dir(root, int(text))):
        raise ConfigError(f"{path}: names no complete checkpoint ({text!r})")
    return int(text)


def is_megatron_root(path: str) -> bool:
    """A root written by the megatron-core engine (or `convert --to megatron`)."""
    return os.path.isfile(os.path.join(path, TRACKER))


def deepspeed_latest_tag(root: str) -> Optional[str]:
    """The tag named by DeepSpeed's ``latest`` file, or None when there is none."""
    latest = os.path.join(root, DEEPSPEED_LATEST)
    if not os.path.isfile(latest):
        return None
    return open(latest, encoding="utf-8").read().strip()


def is_deepspeed_root(path: str) -> bool:
    """A root with a ``latest`` tag whose folder holds DeepSpeed optimizer files."""
    tag = deepspeed_latest_tag(path)
    if tag is None:
        return False
    folder = os.path.join(path, tag)
    return os.path.isdir(folder) and any(DEEPSPEED_OPTIM_RE.match(f) for f in os.listdir(folder))


def read_checkpoint_metadata(folder: str) -> dict:
    """``<folder>/megatron_llama.json``, or {} when the folder has none."""
    path = os.path.join(folder, METADATA)
    if not os.path.isfile(path):
        return {}
    return read_json_object(path)
