"""Every runtime adaptation of megatron-core and torch, applied by one `install()`.

megatron-core is used as released (0.16.1); what it needs to run the way this project runs
it is patched at run time, here and nowhere else, by `install()`:

=====================  ===================================================  ===============
module                 what it changes                                       where
=====================  ===================================================  ===============
`safe_loading`         DCP's two unpickling reads admit plain data only       every host
`optimizer`            DistributedOptimizer resumes exactly (step state)      every host
`cpu_adapter`          ``torch.cuda`` calls inside megatron-core go to CPU    CPU-only hosts
`cpu_fastpaths`        cheaper one-rank collectives, clipping, cross entropy  CPU-only hosts
`cpu_rope`             RoPE in one pass instead of megatron-core's unfused    CPU-only hosts
=====================  ===================================================  ===============

On a CUDA host only the first two apply: GPU users run megatron-core's own CUDA paths
(NCCL, Transformer Engine, apex, fused kernels). Per-optimizer adaptations are applied by
the engine that builds the optimizer (`optimizer.adapt_optimizer`). Host tuning that is not
about megatron-core (glibc malloc) lives in `megatron_llama.process_tuning`.

The patches are written against megatron-core 0.16.1 (`MEGATRON_CORE_VERSION`); `install()`
refuses another version with one line unless ``MEGATRON_LLAMA_ALLOW_MEGATRON_CORE=1`` is
set. `parallel.initialize` calls `install()`; it is idempotent. Checkpoint readers also
ensure the restricted unpickling themselves (`safe_loading.install`, idempotent), so that no
read can run unrestricted even outside a training or conversion process.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_llama.errors import ConfigError

MEGATRON_CORE_VERSION = "0.16.1"
ALLOW_OTHER_VERSION_ENV = "MEGATRON_LLAMA_ALLOW_MEGATRON_CORE"
_installed: Optional[tuple[str, ...]] = None


def installed_megatron_core_version() -> Optional[str]:
    """The installed megatron-core's version string, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def check_megatron_core_version(installed: Optional[str] = None) -> None:
    """Refuse, with one line, a megatron-core other than the one the patches were written for.

    ``installed`` defaults to the installed version. ``MEGATRON_LLAMA_ALLOW_MEGATRON_CORE=1``
    lets any version through (at your own risk: a patched function may have changed)."""
    installed = installed if installed is not None else installed_megatron_core_version()
    if installed == MEGATRON_CORE_VERSION:
        return
    if os.environ.get(ALLOW_OTHER_VERSION_ENV) == "1":
        return
    found = (f"megatron-core {installed} is installed" if installed
             else "megatron-core is not installed")
    want = MEGATRON_CORE_VERSION
    raise ConfigError(f"{found}, but megatron_llama's runtime adaptations are written for "
                      f"{want}: pip install megatron-core=={want}"
                      f" (or set {ALLOW_OTHER_VERSION_ENV}=1 to try this version anyway)")


def install() -> tuple[str, ...]:
    """Apply every adaptation above once per process; returns the names of those applied.

    Idempotent: later calls return the same names and change nothing."""
    global _installed
    if _installed is not None:
        return _installed
    check_megatron_core_version()
    import torch

    from megatron_llama.compat import optimizer, safe_loading

    safe_loading.install()
    optimizer.install()
    applied = ["safe_loading", "optimizer"]
    if not torch.cuda.is_available():
        from megatron_llama.compat import cpu_adapter, cpu_fastpaths, cpu_rope

        cpu_adapter.enable_cpu_adapter()
        cpu_fastpaths.install_cpu_fastpaths()
        cpu_rope.install_cpu_rope()
        applied += ["cpu_adapter", "cpu_fastpaths", "cpu_rope"]
    _installed = tuple(applied)
    return _installed
