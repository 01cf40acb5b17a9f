"""Output directories appear whole or not at all (`fileio.staged_directory`)."""

from __future__ import annotations

import os

import pytest

from megatron_llama.errors import ConfigError
from megatron_llama.fileio import staged_directory, write_json, write_text


def test_staged_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with staged_directory(str(out)) as tmp:
            write_text(os.path.join(tmp, "a.txt"), "half")
            raise KeyboardInterrupt  # Ctrl-C while writing
    assert os.listdir(tmp_path) == []  # no output, no temporary left behind

    with staged_directory(str(out)) as tmp:
        write_text(os.path.join(tmp, "a.txt"), "first")
        assert not out.exists()  # not visible while it is being written
    assert (out / "a.txt").read_text() == "first"

    with pytest.raises(ConfigError, match="already exists .pass --force"):
        with staged_directory(str(out)):
            pass
    with pytest.raises(RuntimeError):
        with staged_directory(str(out), force=True) as tmp:
            write_json({"x": 1}, os.path.join(tmp, "b.json"))
            raise RuntimeError("writer failed")
    assert sorted(os.listdir(out)) == ["a.txt"]  # a failed replacement keeps the old output
    with staged_directory(str(out), force=True) as tmp:
        write_json({"x": 1}, os.path.join(tmp, "b.json"))
    assert sorted(os.listdir(out)) == ["b.json"]  # a complete one replaces it
    assert sorted(os.listdir(tmp_path)) == ["model"]

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file; the output is a directory"):
        with staged_directory(str(tmp_path / "file"), force=True):
            pass
