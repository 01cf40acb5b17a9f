"""The paper's recipe: schedule shape, preset defaults, FLOPs, and refusal of impossible runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_llama.model.presets import PRESETS
from megatron_llama.training.engines.megatron_core import build_scheduler
from megatron_llama.training.metrics import flops_per_token, gpu_peak_tflops
from megatron_llama.training.recipe import TrainConfig, lr_at


def paper_config(**kw) -> TrainConfig:
    return TrainConfig.from_preset(PRESETS["65B"], train_steps=kw.pop("train_steps", 333_800), **kw)


def test_paper_defaults_from_preset():
    cfg = TrainConfig.from_preset(PRESETS["7B"])
    assert (cfg.global_batch, cfg.seq_length) == (2048, 2048)  # 4M tokens
    assert (cfg.lr, cfg.warmup_steps) == (3e-4, 2000) and cfg.min_lr == pytest.approx(3e-5)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay, cfg.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert TrainConfig.from_preset(PRESETS["65B"]).lr == 1.5e-4


def test_schedule_has_the_papers_shape():
    cfg = paper_config()
    peak = cfg.lr
    assert lr_at(1, cfg) == pytest.approx(peak / 2000)
    assert lr_at(1000, cfg) == pytest.approx(peak / 2)          # linear warmup
    assert lr_at(2000, cfg) == pytest.approx(peak)              # peak after 2000 steps
    middle = 2000 + (cfg.train_steps - 2000) // 2
    assert lr_at(middle, cfg) == pytest.approx(0.55 * peak, rel=1e-4)  # cosine midpoint
    assert lr_at(cfg.train_steps, cfg) == pytest.approx(0.1 * peak)  # 10 % floor
    values = [lr_at(s, cfg) for s in range(2000, cfg.train_steps + 1, 997)]
    assert all(a >= b for a, b in zip(values, values[1:]))      # monotone decay


def test_megatron_scheduler_follows_the_schedule():
    cfg = paper_config(train_steps=500, warmup_steps=50)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(1, cfg.train_steps + 1):
        scheduler.step(1)  # the loop advances the schedule before each update
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg), rel=1e-12)
        assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_flops_and_peaks():
    cfg = PRESETS["7B"].model
    n = cfg.num_params(include_embedding=False)
    assert n == 6_738_415_616 - 32000 * 4096
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 32 * 32 * 128 * 2048
    # The paper's 65B: ~380 tokens/s/GPU on A100 is ~49 % MFU by PaLM's formula.
    mfu = 380 * flops_per_token(PRESETS["65B"].model, 2048) / 312e12
    assert 0.45 < mfu < 0.52
    assert 312e12 / flops_per_token(PRESETS["7B"].model, 2048) == pytest.approx(7279, rel=2e-3)
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and gpu_peak_tflops("H100 SXM") == 989


@pytest.mark.parametrize("flags, env_world, message", [
    (["--preset", "33B", "--tp", "8"], 8, "n_heads=52 is not divisible by TP=8"),
    (["--tp", "2"], 3, "world size 3 is not divisible by TP\\*PP=2"),
    (["--pp", "3"], 3, "n_layers=4 is not divisible by PP\\*VP=3"),
    (["--global-batch", "10", "--micro-batch", "4"], 1, "global batch 10 is not divisible"),
    (["--seq-length", "4096"], 1, "exceeds the model's max_seq_len"),
])
@pytest.mark.slow
def test_impossible_runs_refused_with_one_line(flags, env_world, message, tmp_path):
    env = dict(os.environ, WORLD_SIZE=str(env_world), RANK="0")
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", "pretrain", "--synthetic",
                             "--save", str(tmp_path / "ckpt"), *flags],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "ckpt").exists()  # no work was done
