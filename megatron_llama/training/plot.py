"""`megatron-llama plot`: training curves (loss, lr, throughput) from a run's JSONL log."""

from __future__ import annotations

import json
import os

from megatron_llama.errors import ConfigError, require
from megatron_llama.fileio import write_figure


def read_log(path: str) -> list[dict]:
    """Records of a JSONL log; a torn last line (crash mid-write) is ignored."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: log file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not records:
        raise ConfigError(f"{path}: no log records")
    return records


def plot_log(log_path: str, output: str) -> str:
    """Render loss (train and validation), lr and tokens/s/GPU to a PNG; returns its path."""
    matplotlib = require("matplotlib", "megatron-llama plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = {}
    for r in records:
        if "loss" in r:
            train[r["step"]] = r  # a resumed run re-logs steps: keep the latest
    valid = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    steps = sorted(train)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [train[s]["loss"] for s in steps], label="train")
    if valid:
        vs = sorted(valid)
        axes[0].plot(vs, [valid[s] for s in vs], "o-", label="validation")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [train[s]["lr"] for s in steps])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(steps, [train[s]["tokens_per_s_per_gpu"] for s in steps])
    axes[2].set(title="tokens/s/GPU", xlabel="step")
    fig.tight_layout()
    return write_figure(fig, output, dpi=100)
