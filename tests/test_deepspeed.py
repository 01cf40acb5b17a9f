"""DeepSpeed engine: ZeRO-1/2/3 around the same megatron-core model give the megatron-core
engine's losses; resume is exact; DeepSpeed checkpoints convert to Meta, Megatron and HF."""

from __future__ import annotations

import math
import os

import pytest

from megatron_llama.errors import ConfigError
from megatron_llama.local_ranks import run_processes
from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout
from megatron_llama.training.recipe import TrainConfig

MODEL = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=16,
                    max_seq_len=32)
STEPS = 6
TOLERANCE = 1e-6  # relative, per step, fp32: measured 2e-8 (reduction order); weight decay
# wrongly applied to the norm weights already shows as 1e-5


def run_config(workdir, name, **overrides) -> TrainConfig:
    base = dict(model=MODEL, layout=ParallelLayout(), seq_length=32, micro_batch=1,
                global_batch=8, train_steps=STEPS, warmup_steps=2, lr=3e-3, dtype="fp32",
                seed=7, log_file=os.path.join(workdir, f"{name}.jsonl"))
    base.update(overrides)
    return TrainConfig(**base)


def engines_worker(rank, world, workdir):
    from megatron_llama.training.loop import pretrain

    out = {"megatron": pretrain(run_config(workdir, "megatron"))["losses"]}
    for stage in (1, 2, 3):
        out[f"zero{stage}"] = pretrain(run_config(
            workdir, f"zero{stage}", engine="deepspeed", zero_stage=stage,
            save_dir=os.path.join(workdir, f"zero{stage}")))["losses"]
    out["zero2-offload"] = pretrain(run_config(workdir, "offload", engine="deepspeed",
                                               zero_stage=2, offload_optimizer=True))["losses"]
    out["tp2"] = pretrain(run_config(workdir, "tp2", engine="deepspeed", zero_stage=1,
                                     layout=ParallelLayout(tp=2),
                                     save_dir=os.path.join(workdir, "tp2")))["losses"]
    # Resume: ZeRO-2 stopped after step 3 (checkpoint), then resumed to the end.
    save = os.path.join(workdir, "ckpt")
    first = pretrain(run_config(workdir, "part1", engine="deepspeed", zero_stage=2,
                                save_dir=save, exit_after_steps=3))
    second = pretrain(run_config(workdir, "part2", engine="deepspeed", zero_stage=2,
                                 save_dir=save, load_dir=save))
    out["resumed"] = {**first["losses"], **second["losses"]}
    # A NaN loss at step 2: DeepSpeed skips that update like the megatron-core engine does.
    os.environ["MEGATRON_LLAMA_TEST_NAN_STEPS"] = "2"
    try:
        out["nan"] = pretrain(run_config(workdir, "nan", engine="deepspeed", zero_stage=1,
                                         train_steps=4))
    finally:
        del os.environ["MEGATRON_LLAMA_TEST_NAN_STEPS"]
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_zero_stages_match_megatron_engine_and_resume_exactly(tmp_path):
    results = run_processes(engines_worker, 2, str(tmp_path), timeout=900)
    losses = results[0]
    reference = losses["megatron"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    for name in ("zero1", "zero2", "zero3", "zero2-offload", "tp2"):
        worst = max(abs(losses[name][s] - v) / abs(v) for s, v in reference.items())
        print(f"{name}: worst relative loss difference to megatron-core over {STEPS} steps "
              f"{worst:.2e}")
        assert worst <= TOLERANCE, (name, losses[name], reference)
    assert losses["resumed"] == losses["zero2"]  # bitwise
    nan = losses["nan"]
    assert nan["skipped"] == 1 and math.isnan(nan["losses"][2])
    assert all(math.isfinite(nan["losses"][s]) for s in (1, 3, 4))
    check_conversions(tmp_path)


def check_conversions(tmp_path):
    """DeepSpeed checkpoints -> Meta / Megatron / HF, consolidated exactly as DeepSpeed does."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megatron_llama.convert.deepspeed_checkpoint import DeepSpeedCheckpoint
    from megatron_llama.convert.meta import MetaCheckpoint
    from megatron_llama.convert.run import convert, detect_format
    from megatron_llama.model.canonical import megatron_to_meta

    for stage in (1, 2, 3):
        root = str(tmp_path / f"zero{stage}")
        assert detect_format(root) == "deepspeed"
        # DeepSpeed's own consolidation (its script unpickles fully: test-only, our own files)
        theirs = megatron_to_meta({(0, 0, 0): {k: v.contiguous() for k, v in
                                                get_fp32_state_dict_from_zero_checkpoint(root).items()}},
                                  MODEL)
        ours = DeepSpeedCheckpoint(root)
        assert ours.ranks[0].stage == stage
        for key, value in theirs.items():
            assert torch.equal(ours.tensor(key), value), (stage, key)
        convert(root, str(tmp_path / f"meta{stage}"), "meta", progress=False)
        meta = MetaCheckpoint(str(tmp_path / f"meta{stage}"))
        assert all(torch.equal(meta.tensor(k), v) for k, v in theirs.items())
    convert(str(tmp_path / "zero3"), str(tmp_path / "mcore"), "megatron", progress=False)
    convert(str(tmp_path / "mcore"), str(tmp_path / "back"), "meta", progress=False)
    back = MetaCheckpoint(str(tmp_path / "back"))
    assert all(torch.equal(back.tensor(k), meta.tensor(k)) for k in theirs)
    convert(str(tmp_path / "zero3"), str(tmp_path / "hf"), "hf", progress=False)
    # TP=2: both ranks' weights merged, equal to the module weights DeepSpeed saved per rank.
    tag = (tmp_path / "tp2" / "latest").read_text().strip()
    modules = {(0, 0, r): torch.load(tmp_path / "tp2" / tag / f"mp_rank_{r:02d}_model_states.pt",
                                     weights_only=True)["module"] for r in range(2)}
    expected = megatron_to_meta(modules, MODEL, tp=2)
    tp2 = DeepSpeedCheckpoint(str(tmp_path / "tp2"))
    assert all(torch.equal(tp2.tensor(k), v) for k, v in expected.items())


def test_deepspeed_layout_refusals():
    from megatron_llama.training.engines import check

    with pytest.raises(ConfigError, match="without pipeline parallelism"):
        check(TrainConfig(model=MODEL, layout=ParallelLayout(pp=2), seq_length=32,
                          global_batch=8, engine="deepspeed"), 2)
    with pytest.raises(ConfigError, match="without --sp"):
        check(TrainConfig(model=MODEL, layout=ParallelLayout(tp=2, sp=True), seq_length=32,
                          global_batch=8, engine="deepspeed"), 2)


def test_deepspeed_config_from_flags_and_override(tmp_path):
    import json

    from megatron_llama.training.engines.deepspeed_zero import deepspeed_config

    cfg = TrainConfig(model=MODEL, seq_length=32, micro_batch=2, global_batch=16, dtype="bf16",
                      clip_grad=0.5, lr=1e-3, adam_beta2=0.95, weight_decay=0.1,
                      engine="deepspeed", zero_stage=3, offload_optimizer=True)
    config = deepspeed_config(cfg, dp_size=2)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 4)
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    opt = config["optimizer"]["params"]
    assert (opt["lr"], opt["betas"], opt["weight_decay"], opt["torch_adam"]) == (1e-3, [0.9, 0.95], 0.1, False)
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"overlap_comm": True},
                                    "gradient_clipping": 2.0}))
    cfg.deepspeed_config = str(override)
    merged = deepspeed_config(cfg, dp_size=2)
    assert merged["zero_optimization"]["overlap_comm"] and merged["zero_optimization"]["stage"] == 3
    assert merged["gradient_clipping"] == 2.0
    override.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(cfg, dp_size=2)


def test_megatron_engine_refuses_a_deepspeed_checkpoint(megatron_single, tmp_path):
    from megatron_llama.training.loop import pretrain

    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest").write_text("iter_0000002")
    cfg = TrainConfig(model=MODEL, seq_length=32, global_batch=2, train_steps=1,
                      dtype="fp32", load_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="a DeepSpeed checkpoint; resume it with --engine deepspeed"):
        pretrain(cfg)


def test_deepspeed_resume_loads_refuse_pickled_code(tmp_path):
    """DeepSpeed's own loader unpickles everything; ours admits tensors, plain data and
    DeepSpeed's loss-scaler classes only."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from megatron_llama.training.engines.deepspeed_zero import _WeightsOnlyLoads

    class Inner:
        name = "TorchCheckpointEngine"

    loads = _WeightsOnlyLoads(Inner())
    assert loads.name == "TorchCheckpointEngine"          # everything else is delegated
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "step": 3}, good)
    assert loads.load(str(good), map_location="cpu")["step"] == 3
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad.pt"
    torch.save({"client_state": RunsCode()}, bad)
    with pytest.raises(ConfigError, match="bad.pt: refused: loading it would run pickled code"):
        loads.load(str(bad), map_location="cpu")
    assert not marker.exists()
