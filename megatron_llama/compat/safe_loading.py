"""Reading megatron-core checkpoints without running pickled code.

megatron-core saves with torch.distributed.checkpoint (DCP). Two of DCP's reads unpickle
with no restriction at all, so a crafted checkpoint could run code when it is converted,
resumed or used by `generate`:

- ``FileSystemReader.read_metadata`` reads ``<checkpoint>/.metadata`` with ``pickle.load``;
- ``DefaultLoadPlanner.load_bytes`` (which megatron-core's load planner inherits) reads
  every non-tensor item (the RNG states, the layers' ``_extra_state``) with
  ``torch.load(weights_only=False)``.

`install()` (idempotent) closes both, and `reading(path)` wraps every checkpoint read in
this package: it installs, checks ``.metadata`` up front and turns a refusal raised inside
DCP (which wraps errors in its own ``CheckpointException``) back into the one-line error:

- ``.metadata`` is read by `MetadataUnpickler`, which admits only DCP's own metadata
  classes (``torch.distributed.checkpoint.metadata/planner/filesystem``), ``torch.Size``,
  dtypes, layouts and memory formats; anything else is refused;
- each bytes item is first loaded with ``torch.load(weights_only=True)`` (torch's restricted
  unpickler, plus numpy's array reconstruction for NumPy's RNG state). Only if that
  succeeds does DCP's own load run on the same bytes: a pickle that the restricted
  unpickler accepts references no other callables, so the second load runs nothing else.

Refusals are one-line `ConfigError`s naming the item.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
from typing import Iterator, Optional

import torch

from megatron_llama.errors import ConfigError, require

# The only globals DCP's .metadata may name: its plain dataclasses and enums, by exact name
# (a whole-module rule would admit e.g. functools.reduce or file writers imported there).
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},   # a lookup of torch.strided & co by name
    "collections": {"OrderedDict"},
    # storage_meta.checkpoint_id: a path, rebuilt from its parts
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class Disallowed(pickle.UnpicklingError):
    """The pickle references a global outside the allowlist (it could run code)."""


def _enum_member(cls, name):
    """``getattr`` as some Python 3.11 releases pickle an Enum member (``getattr(cls,
    name)``; 3.11.2, Debian 12's, does), admitted only for a member of an allowlisted Enum:
    never an attribute or a method."""
    import enum

    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls.__members__[name]
    raise Disallowed(f"getattr({getattr(cls, '__name__', cls)!r}, {name!r}) is not allowed in "
                     "checkpoint metadata")


class MetadataUnpickler(pickle.Unpickler):
    """A pickle reader for DCP's ``.metadata`` that refuses every other global."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name == "getattr":  # Enum members only (_enum_member)
            return _enum_member
        # no dotted names: pickle protocol 4 would walk "os.system" from any allowed module
        allowed = "." not in name and (
            name in _ALLOWED.get(module, ())
            or (module == "torch" and isinstance(getattr(torch, name, None),
                                                  _TORCH_VALUE_TYPES)))
        if not allowed:
            raise Disallowed(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside DCP's filesystem module: `load` is
    restricted, everything else (``dump`` when saving) is the real one."""

    def __getattr__(self, name: str):
        return getattr(pickle, name)

    @staticmethod
    def load(file, **_kwargs):
        try:
            return MetadataUnpickler(file).load()
        except Disallowed as e:
            where = getattr(file, "name", "checkpoint .metadata")
            raise ConfigError(f"{where}: refused: {e}") from None


def _bytes_globals() -> list:
    """What the non-tensor items legitimately hold beyond torch's defaults: NumPy's RNG
    state (a uint32 array) inside megatron-core's saved RNG state, and on GPU hosts
    Transformer Engine's FP8 recipe classes."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:  # Transformer Engine's FP8 extra state pickles its recipe (plain dataclasses, enums)
        import transformer_engine.common.recipe as te_recipe
    except Exception:  # noqa: BLE001 - no TE (CPU hosts) or a broken install: nothing to add
        return allowed
    return allowed + [obj for obj in vars(te_recipe).values()
                      if isinstance(obj, type) and obj.__module__ == te_recipe.__name__]


def _check_bytes(read_item, value: io.BytesIO) -> None:
    start = value.tell()
    try:
        with torch.serialization.safe_globals(_bytes_globals()):
            torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        key = getattr(getattr(read_item, "dest_index", None), "fqn", "a checkpoint item")
        raise ConfigError(f"checkpoint item {key}: refused: loading it would run pickled "
                          f"code ({str(e).splitlines()[0][:160]})") from None
    finally:
        value.seek(start)


def deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes that its optimizer files pickle (loss scaler state,
    the ZeRO stage enum, fragment addresses), for ``torch.load(weights_only=True)`` of a
    DeepSpeed checkpoint; everything else stays refused."""
    require("deepspeed", "reading a DeepSpeed checkpoint")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@functools.cache
def install() -> None:
    """Restrict DCP's two unpickling reads (see the module doc). Safe to call repeatedly."""
    from torch.distributed.checkpoint import default_planner, filesystem

    filesystem.pickle = _RestrictedPickleModule()
    original = default_planner.DefaultLoadPlanner.load_bytes

    @functools.wraps(original)
    def load_bytes(self, read_item, value):
        _check_bytes(read_item, value)
        return original(self, read_item, value)

    default_planner.DefaultLoadPlanner.load_bytes = load_bytes


def check_metadata(checkpoint_dir: str) -> None:
    """Read ``<checkpoint_dir>/.metadata`` with `MetadataUnpickler`: a one-line
    `ConfigError` if it is missing, corrupt or references anything else."""
    path = os.path.join(checkpoint_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (not a complete megatron-core checkpoint)") from None
    except Disallowed as e:
        raise ConfigError(f"{path}: refused: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ConfigError(f"{path}: corrupt checkpoint metadata ({e})") from None
    # data files must lie inside the checkpoint: no absolute paths, no ".."
    storage = getattr(metadata, "storage_data", None)
    for info in (storage.values() if isinstance(storage, dict) else ()):
        rel = str(getattr(info, "relative_path", ""))
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise ConfigError(f"{path}: refused: data file {rel!r} lies outside the checkpoint")


def _refusal(exc: BaseException) -> Optional[ConfigError]:
    """The `ConfigError` inside ``exc``: itself, a rank's failure of DCP's
    ``CheckpointException``, or an exception it was raised from."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return e
        for failure in (getattr(e, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
        stack += [e.__cause__, e.__context__]
    return None


@contextlib.contextmanager
def reading(checkpoint_dir: str) -> Iterator[None]:
    """Around a megatron-core / DCP load of ``checkpoint_dir``: restricted unpickling
    installed, ``.metadata`` checked first, refusals raised as one-line `ConfigError`s."""
    install()  # part of `compat.install`; repeated here so that no read is ever unrestricted
    check_metadata(checkpoint_dir)
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        refusal = _refusal(e)
        if refusal is None:
            raise
        raise ConfigError(str(refusal)) from None
