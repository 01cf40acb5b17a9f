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


def test_missing_optional_package_names_its_extra(tmp_path, monkeypatch):
    from megatron_llama.errors import check_installed, require

    with pytest.raises(ConfigError) as e:
        require("no_such_package_xyz.sub", "--frobnicate")
    assert str(e.value) == ("--frobnicate needs no_such_package_xyz, which is not installed: "
                            "pip install 'megatron_llama[no_such_package_xyz]' "
                            "(or pip install no_such_package_xyz)")
    for module, extra in (("matplotlib", "plot"), ("deepspeed", "deepspeed"), ("wandb", "wandb"),
                          ("transformers", "hf")):  # the extras of setup.py
        with pytest.raises(ConfigError, match=rf"pip install 'megatron_llama\[{extra}\]'"):
            require(f"{module}.definitely_missing_module", "x")
    # a package that is there but broken inside keeps its own error
    (tmp_path / "broken_pkg_xyz").mkdir()
    (tmp_path / "broken_pkg_xyz" / "__init__.py").write_text("import not_there_either_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_there_either_xyz"):
        require("broken_pkg_xyz", "x")
    check_installed("broken_pkg_xyz", "x")  # installed: no error before the work
