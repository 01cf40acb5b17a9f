"""Session fixtures: one world-size-1 megatron-core setup shared by in-process tests."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("WANDB_MODE", "offline")
# DeepSpeed compiles a small CPU communication op on its first run: one cache for all tests.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                           "megatron_llama", "torch_extensions"))
warnings.filterwarnings("ignore", message="Apex is not installed")


@pytest.fixture(scope="session")
def megatron_single():
    """torch.distributed with one process (gloo); tests call parallel.initialize/destroy."""
    import torch

    from megatron_llama.parallel import init_distributed

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    init_distributed()
    yield
