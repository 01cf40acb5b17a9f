"""The layout's rules: one-way imports, one CLI convention, one compat install, flags from
fields."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from megatron_llama.errors import ConfigError
from tests import import_graph

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "megatron_llama")
COMMANDS = {"info", "selfcheck", "corpus", "train-tokenizer", "preprocess", "finetune-data",
            "pretrain", "plot", "finetune", "convert", "merge-lora", "generate", "evaluate",
            "lm-eval", "sbatch", "benchmark", "plan"}


def test_imports_have_no_cycle_and_run_one_way():
    graph = import_graph.import_graph(PACKAGE_DIR)
    assert len(graph) > 50 and "megatron_llama.model.config" in graph
    assert import_graph.report(PACKAGE_DIR) == []
    # every module sits in a stage
    assert {m.split(".")[1] for m in graph if "." in m} <= set(import_graph.STAGES)


def test_checker_finds_an_injected_cycle_and_wrong_directions(tmp_path):
    copy = tmp_path / "megatron_llama"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "model" / "config.py", "a", encoding="utf-8") as f:
        f.write(textwrap.dedent("""
            def _injected():
                from megatron_llama.model import canonical  # canonical imports config: a cycle
                from megatron_llama.training.loop import pretrain  # model -> training: upward
                from megatron_llama.data import tokenizer  # model -> data: sideways
            """))
    with open(copy / "training" / "engines" / "base.py", "a", encoding="utf-8") as f:
        f.write("\nfrom megatron_llama.training import loop  # engines -> loop\n")
    problems = import_graph.report(str(copy))
    assert any(p.startswith("import cycle:") and "megatron_llama.model.canonical" in p
               and "megatron_llama.model.config" in p for p in problems), problems
    assert ("megatron_llama.model.config -> megatron_llama.training.loop: upward import "
            "(stage 3 model -> stage 5 training)") in problems
    assert any(p.startswith("megatron_llama.model.config -> megatron_llama.data.tokenizer: "
                            "sideways") for p in problems)
    assert ("megatron_llama.training.engines.base -> megatron_llama.training.loop: against "
            "megatron_llama.training's order") in problems


def test_cli_lists_every_command_and_stays_light():
    from megatron_llama import cli

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == COMMANDS
    for module in cli.COMMAND_MODULES:
        assert callable(module.add_command), module.__name__
    pretrain_help = subparsers.choices["pretrain"].format_help()
    assert "cosine to 10%, 4M-token" in " ".join(pretrain_help.split())  # not "10%%"
    from megatron_llama.convert.megatron_checkpoint import describe_layout

    assert describe_layout({"tp": 2, "pp": 1, "vp": None}) == "TP=2 PP=1"  # not a dict
    # the entry point imports neither torch nor megatron-core until a command runs
    code = ("import sys, megatron_llama.cli; "
            "print(sorted(m for m in ('torch', 'megatron', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(PACKAGE_DIR))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pretrain_flags_come_from_the_config_fields():
    from megatron_llama import cli
    from megatron_llama.model.presets import get_preset
    from megatron_llama.training.commands import train_config_from_args
    from megatron_llama.training.recipe import TrainConfig, cli_fields

    parser = cli.build_parser()
    args = parser.parse_args(["pretrain", "--synthetic"])
    cfg = train_config_from_args(args)
    for f in cli_fields():
        if not f.metadata["derived"]:  # the field's own default, written once
            assert getattr(cfg, f.name) == f.default, f.name
    preset = get_preset("tiny")
    assert cfg.model == preset.model and cfg.lr == preset.lr
    assert cfg.seq_length == preset.model.max_seq_len
    assert cfg.global_batch == preset.batch_tokens // cfg.seq_length
    assert cfg.warmup_steps == 2000 and cfg.adam_beta2 == 0.95 and cfg.data_blend is None
    args = parser.parse_args(["pretrain", "--data", "b.yaml", "--save", "ck", "--on-nan", "stop",
                              "--tp", "2", "--sp", "--warmup-steps", "5", "--n-kv-heads", "2",
                              "--zero-stage", "3", "--offload-optimizer"])
    cfg = train_config_from_args(args)
    assert (cfg.data_blend, cfg.save_dir, cfg.load_dir) == ("b.yaml", "ck", "ck")
    assert (cfg.nan_policy, cfg.layout.tp, cfg.layout.sp) == ("stop", 2, True)
    assert (cfg.warmup_steps, cfg.model.n_kv_heads) == (5, 2)
    assert (cfg.zero_stage, cfg.offload_optimizer) == (3, True)
    # every field but the two nested ones is a flag
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "layout"}
    assert names == {f.name for f in cli_fields()}


def test_megatron_core_version_is_checked(monkeypatch):
    from megatron_llama import compat

    compat.check_megatron_core_version()  # the installed one is the pinned one
    assert compat.installed_megatron_core_version() == compat.MEGATRON_CORE_VERSION == "0.16.1"
    with pytest.raises(ConfigError) as e:
        compat.check_megatron_core_version("0.17.0")
    message = str(e.value)
    assert "\n" not in message
    assert "megatron-core 0.17.0 is installed" in message
    assert "pip install megatron-core==0.16.1" in message
    assert compat.ALLOW_OTHER_VERSION_ENV in message
    monkeypatch.setenv(compat.ALLOW_OTHER_VERSION_ENV, "1")
    compat.check_megatron_core_version("0.17.0")  # the override lets it through


INSTALL_PROBE = """
import torch
from megatron.core.transformer import attention
from megatron.core.distributed import param_and_grad_buffer as pgb
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron_llama import compat
from megatron_llama.model.spec import get_llama_layer_spec

rope, gather, cuda = attention.apply_rotary_pos_emb, pgb.dist_all_gather_func, torch.Tensor.cuda
get_llama_layer_spec("local")  # building a spec patches nothing
assert attention.apply_rotary_pos_emb is rope and pgb.dist_all_gather_func is gather
assert torch.Tensor.cuda is cuda and not hasattr(DistributedOptimizer, "_megatron_llama_step_fix")
applied = compat.install()
expected = ("safe_loading", "optimizer", "cpu_adapter", "cpu_fastpaths", "cpu_rope")
assert applied == expected, applied
patched = (attention.apply_rotary_pos_emb, pgb.dist_all_gather_func, torch.Tensor.cuda)
assert patched[0] is not rope and patched[1] is not gather and patched[2] is not cuda
assert compat.install() == applied  # idempotent: nothing is wrapped twice
assert (attention.apply_rotary_pos_emb, pgb.dist_all_gather_func, torch.Tensor.cuda) == patched
print("ok")
"""


@pytest.mark.slow
def test_compat_install_applies_everything_once_and_specs_patch_nothing():
    out = subprocess.run([sys.executable, "-c", INSTALL_PROBE], capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(PACKAGE_DIR),
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
