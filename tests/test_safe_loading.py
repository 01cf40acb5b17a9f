"""megatron-core checkpoints (torch DCP) are read without running pickled code: a real
checkpoint with RNG-like non-tensor items loads; a crafted `.metadata` or bytes item is
refused with one line and its code never runs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_llama.compat.safe_loading import install, reading
from megatron_llama.errors import ConfigError


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: what a crafted checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state(extra=None):
    # a tuple is one non-tensor item to DCP (dicts and lists would be flattened), pickled
    # into the checkpoint as bytes, as megatron-core's RNG state and _extra_state are
    rng = (torch.get_rng_state(), np.random.get_state(), 3)
    return {"weight": torch.arange(6.0).reshape(2, 3), "rng_state": extra if extra else rng}


def _load(path: str) -> dict:
    target = {"weight": torch.zeros(2, 3), "rng_state": None}
    with reading(path):
        dcp.load(target, checkpoint_id=path, planner=dcp.DefaultLoadPlanner())
    return target


def test_real_checkpoint_loads_with_restrictions(tmp_path):
    install()
    install()  # idempotent
    dcp.save(_state(), checkpoint_id=str(tmp_path))
    loaded = _load(str(tmp_path))
    assert torch.equal(loaded["weight"], torch.arange(6.0).reshape(2, 3))
    assert loaded["rng_state"][2] == 3
    assert torch.equal(loaded["rng_state"][0], torch.get_rng_state())
    assert np.array_equal(loaded["rng_state"][1][1], np.random.get_state()[1])
    assert dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata


def test_crafted_bytes_item_is_refused(tmp_path):
    install()
    marker = tmp_path / "ran"
    dcp.save(_state(extra=(_RunsCode(str(marker)),)), checkpoint_id=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="rng_state: refused: loading it would run pickled"):
        _load(str(tmp_path / "c"))
    assert not marker.exists()


def test_crafted_metadata_is_refused(tmp_path):
    install()
    marker = tmp_path / "ran"
    path = tmp_path / "c"
    dcp.save(_state(), checkpoint_id=str(path))
    with open(path / ".metadata", "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    with pytest.raises(ConfigError, match=r"\.metadata: refused: io\.open is not allowed"):
        dcp.FileSystemReader(str(path)).read_metadata()
    with pytest.raises(ConfigError):
        _load(str(path))
    assert not marker.exists() and not os.path.exists(marker)


def _stack_global_call(module: str, name: str) -> bytes:
    """A protocol-4 pickle calling ``module``'s ``name`` with no arguments."""
    def text(t: str) -> bytes:
        return b"\x8c" + bytes([len(t)]) + t.encode()
    return b"\x80\x04" + text(module) + text(name) + b"\x93)R."


def test_metadata_names_are_exact_no_dotted_paths(tmp_path):
    """Protocol 4 resolves dotted names from any allowed module ("os.getpid" from DCP's
    metadata module); only exact, listed names pass."""
    from megatron_llama.compat.safe_loading import check_metadata

    path = tmp_path / "c"
    dcp.save(_state(), checkpoint_id=str(path))
    check_metadata(str(path))                                   # the real one passes
    for module, name in (("torch.distributed.checkpoint.metadata", "os.getpid"),
                         ("torch.distributed.checkpoint.planner", "reduce"),
                         ("torch.distributed.checkpoint.filesystem", "FileSystemWriter")):
        (path / ".metadata").write_bytes(_stack_global_call(module, name))
        with pytest.raises(ConfigError, match=f"refused: {module}.{name} is not allowed"):
            check_metadata(str(path))


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    import dataclasses

    from megatron_llama.compat.safe_loading import check_metadata

    path = tmp_path / "c"
    dcp.save(_state(), checkpoint_id=str(path))
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key],
                                                     relative_path="../../etc/passwd")
    with open(path / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(ConfigError, match="data file '../../etc/passwd' lies outside"):
        check_metadata(str(path))


def test_enum_members_pickled_through_getattr_load_and_nothing_else():
    """Python 3.11.2 (Debian 12) pickles an Enum member as getattr(cls, name): admitted for
    members of the allowlisted enums only, never for attributes or other objects."""
    import io

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, Metadata

    from megatron_llama.compat.safe_loading import Disallowed, MetadataUnpickler

    class ByGetattr:
        def __init__(self, target, name):
            self.target, self.name = target, name

        def __reduce__(self):
            return getattr, (self.target, self.name)

    member = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    data = pickle.dumps(ByGetattr(_MEM_FORMAT_ENCODING, member.name))
    assert b"getattr" in data
    assert MetadataUnpickler(io.BytesIO(data)).load() is member
    for target, name in [(_MEM_FORMAT_ENCODING, "__class__"), (Metadata, "__init__"),
                         (_MEM_FORMAT_ENCODING, "_missing_")]:
        with pytest.raises(Disallowed):
            MetadataUnpickler(io.BytesIO(pickle.dumps(ByGetattr(target, name)))).load()
