"""CPU adapter: lets megatron-core's parallel stack run on CPU with the gloo backend.

megatron-core 0.16.1 is written for CUDA. On a host without CUDA, `enable_cpu_adapter()`
redirects the few CUDA assumptions the tensor, sequence and pipeline parallel paths, the
DDP wrapper, the distributed optimizer and dist-checkpointing make. On a CUDA host it does
nothing at all, so GPU users run megatron-core unchanged (NCCL, TE, apex, fused kernels).

What it adapts, and why (all only when ``torch.cuda.is_available()`` is False):

1. The name ``torch`` inside loaded ``megatron.core`` modules is swapped for `_CpuTorch`,
   a thin proxy that forwards every attribute to the real torch except:
   - factory functions (``torch.zeros(..., device="cuda")`` in the schedules, optimizer,
     grad clipping and checkpoint exchange) get ``device="cpu"``;
   - ``torch.cuda``: ``current_device()`` returns the CPU device (layers, rotary
     ``inv_freq``, DDP buffers, SP all-gather buffers), ``synchronize``/``empty_cache``
     are no-ops, and the RNG calls (``get_rng_state``, ``manual_seed`` used by
     ``model_parallel_cuda_manual_seed`` and the RNG tracker) act on the CPU generator,
     which is the generator CPU dropout and initialisation actually draw from.
   Everything else in those modules (``torch.matmul``, ...) is the real function, so the
   per-step cost is one extra attribute lookup per ``torch.`` name: measured below 1 %.
2. The RNG tracker's private ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (used by
   ``fork()`` and by activation recompute) get/set the CPU generator state.
3. ``Tensor.cuda()`` returns the tensor itself (it could only raise on such a host).
4. Code that checks ``param.type() == "torch.cuda.FloatTensor"`` (the distributed and
   mixed-precision optimizers, grad clipping) sees CUDA type names while it runs.
5. ``CheckpointWithoutOutput`` (selective recompute) sets ``fp8 = (fp8 is not None)``,
   i.e. True for ``fp8=False``, then calls Transformer Engine: fixed to ``bool(fp8)``.
6. The RNG tracker warns "CPU RNG state changed within GPU RNG context" whenever it runs
   dropout or initialisation, because on CPU the two generators are one: silenced.
`megatron_llama.compat.install()` calls `enable_cpu_adapter()` (with the CPU fast paths and
RoPE of this package) on CPU-only hosts; it is idempotent. megatron-core modules imported
later (many are imported lazily) get the proxy too, through a small import hook.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import logging
import sys
import types
from typing import Any

import torch

_CPU = torch.device("cpu")
_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor", "empty_strided",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand", "randn", "randint", "linspace",
)
# megatron-core modules on the parallel paths; imported up front so they get adapted.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
)
_enabled = False


def cuda_available() -> bool:
    """True on a CUDA host: the adapter then stays out of the way."""
    return torch.cuda.is_available()


def _to_cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device is not None and (
        (isinstance(device, str) and device.startswith("cuda"))
        or (isinstance(device, torch.device) and device.type == "cuda")
        or isinstance(device, int)
    ):
        kwargs["device"] = _CPU
    return kwargs


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_to_cpu_device(kwargs))
    return wrapper


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as megatron-core should see it on a CPU-only host."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    # The "CUDA" generator is the CPU generator: CPU dropout and init draw from it.
    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    memory_allocated = max_memory_allocated


class _CpuTorch(types.ModuleType):
    """The ``torch`` module with CUDA factory devices mapped to CPU (see module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups are plain attribute hits
        return value


_CPU_TORCH = _CpuTorch()
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``tensor.type()`` reports CPU float tensors under their CUDA names."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(result, result)
        return result

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    if getattr(fn, "_megatron_llama_adapted", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper._megatron_llama_adapted = True
    return wrapper


class _SilenceForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    # Both constructors check param.type() while building their fp32 main-param groups.
    for cls in (distrib_optimizer.DistributedOptimizer,
                optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        clip_grads.clip_grad_by_total_norm_fp32)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    original_init = mrandom.CheckpointWithoutOutput.__init__

    def init(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = bool(fp8)

    mrandom.CheckpointWithoutOutput.__init__ = init
    logging.getLogger(mrandom.__name__).addFilter(_SilenceForkWarning())


class _SwapTorchLoader(importlib.abc.Loader):
    """Runs a megatron-core module's own loader, then gives the module the torch proxy."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        if getattr(module, "torch", None) is torch:
            module.torch = _CPU_TORCH


class _SwapTorchFinder(importlib.abc.MetaPathFinder):
    """Import hook: megatron.core modules imported after enabling are adapted as well."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _SwapTorchLoader(spec.loader)
                return spec
        return None


def _swap_torch_in_loaded_modules() -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _CPU_TORCH


def enable_cpu_adapter() -> bool:
    """Adapt megatron-core to a CPU-only host. Returns True if the adapter is active.

    A no-op returning False when CUDA is available. Safe to call many times.
    """
    global _enabled
    if cuda_available():
        return False
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    _swap_torch_in_loaded_modules()
    if not _enabled:
        sys.meta_path.insert(0, _SwapTorchFinder())
        _patch_rng()
        _patch_type_checks()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        _enabled = True
    return True
