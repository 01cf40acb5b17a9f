"""The console entry point, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_llama.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_info_prints_exact_counts_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for count in ("6,738,415,616", "13,015,864,320", "32,528,943,616", "65,285,660,672"):
        assert count in out
    assert "transformer engine" in out and "apex fused RMSNorm" in out
    assert "gloo (CPU adapter active)" in out  # this machine has no GPU
    assert "torch SDPA" in out


def test_help_explains_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and "info" in result.stdout
    result = run_cli("info", "--help")
    assert "--presets-only" in result.stdout
    result = run_cli("nonsense")
    assert result.returncode == 2 and "invalid choice" in result.stderr
