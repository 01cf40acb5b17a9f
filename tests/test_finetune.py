"""`finetune` end to end from a Meta checkpoint: LoRA at TP=2 with SP (stopped and resumed),
at PP=2 and in one process train alike step for step; merge-lora writes a model whose
validation loss is the adapted model's; bad --from input is one line and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights, reference_logits

CFG = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                  max_seq_len=256)


def run_cli(*args, ok=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", *args],
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline"))
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tokenizer, `finetune-data` output of the built-in instruction set, and a random
    Meta checkpoint (with its tokenizer.model) to fine-tune."""
    from megatron_llama.data.corpus import build_builtin_corpus, pydoc_documents
    from megatron_llama.data.finetune_data import finetune_data
    from megatron_llama.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("finetune")
    corpus = build_builtin_corpus(str(d / "corpus"), max_code_bytes=1 << 14)
    (d / "prose.txt").write_text("\n".join(p["text"] for p in pydoc_documents()))
    tok = train_tokenizer([str(d / "prose.txt")], str(d / "tok"), vocab_size=CFG.vocab_size)
    finetune_data([corpus["alpaca"], corpus["chat"]], str(d / "sft"), tok,
                  max_tokens=CFG.max_seq_len + 1, overlong="drop", progress=False)
    meta = d / "meta"
    meta.mkdir()
    torch.save(random_meta_weights(CFG, seed=3), meta / "consolidated.00.pth")
    CFG.to_params_json(str(meta / "params.json"))
    shutil.copy(tok, meta / "tokenizer.model")
    return {"dir": d, "meta": str(meta), "data": str(d / "sft")}


def records(save_dir):
    with open(os.path.join(save_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def curve(save_dir):
    """({step: (train loss, grad norm)}, {step: validation loss}, packing efficiency)."""
    recs = records(save_dir)
    train = {r["step"]: (r["loss"], r["grad_norm"]) for r in recs if "loss" in r}
    valid = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    packing = [r["packing_efficiency"] for r in recs if "packing_efficiency" in r]
    return train, valid, packing


LORA = ["--data", None, "--global-batch", "4", "--train-steps", "3", "--lr", "1e-2",
        "--warmup-steps", "0", "--lora-rank", "4", "--lora-dropout", "0", "--eval-interval", "3"]


def lora_args(base, save, *layout):
    args = ["finetune", "--from", base["meta"], *LORA, "--save", str(save), *layout]
    args[args.index("--data") + 1] = base["data"]
    return args


@pytest.mark.multiprocess
def test_lora_layouts_resume_and_merge(base, tmp_path):
    # LoRA at TP=2 + SP, stopped after step 2 and resumed
    tp2 = tmp_path / "tp2"
    out = run_cli(*lora_args(base, tp2, "--tp", "2", "--sp", "--nproc-per-node", "2",
                             "--exit-after-steps", "2")).stdout
    assert "trainable parameters" in out and "packing efficiency" in out
    run_cli(*lora_args(base, tp2, "--tp", "2", "--sp", "--nproc-per-node", "2"))
    one = tmp_path / "one"
    run_cli(*lora_args(base, one))
    pp2 = tmp_path / "pp2"
    run_cli(*lora_args(base, pp2, "--pp", "2", "--nproc-per-node", "2"))
    ref_train, ref_valid, packing = curve(one)
    assert sorted(ref_train) == [1, 2, 3] and 0.5 < packing[0] <= 1.0
    assert ref_train[3][0] < ref_train[1][0] - 0.05  # the adapters learn
    for run in (tp2, pp2):
        train, valid, _ = curve(run)
        for step, (loss, norm) in ref_train.items():
            assert abs(train[step][0] - loss) <= 1e-5 * loss, (run, step, train[step], loss)
            assert abs(train[step][1] - norm) <= 1e-4 * norm, (run, step, train[step], norm)
        assert abs(valid[3] - ref_valid[3]) <= 1e-5 * ref_valid[3]
    # --from a Hugging Face export of the same base: the same first step
    from megatron_llama.convert.run import convert

    convert(base["meta"], str(tmp_path / "hf"), "hf", progress=False)
    from_hf = tmp_path / "from-hf"
    args = lora_args(base, from_hf)
    args[args.index("--from") + 1] = str(tmp_path / "hf")
    args[args.index("--train-steps") + 1] = "1"
    run_cli(*args)
    assert abs(curve(from_hf)[0][1][0] - ref_train[1][0]) <= 1e-6 * ref_train[1][0]
    # adapter-only checkpoints: every stored tensor is an adapter or its optimizer state
    from megatron_llama.convert.megatron_checkpoint import stored_shapes

    stored = stored_shapes(os.path.join(tp2, "iter_0000003"))
    assert len(stored) == 8 + 3 * 8 and all("_lora." in k for k in stored), sorted(stored)[:3]
    # merged into the base (from the TP=2 adapters): the reference forward of the merged
    # weights gives the adapted model's validation loss over the held-out examples
    from megatron_llama.cli import main

    merged = tmp_path / "merged"
    assert main(["merge-lora", "--input", str(tp2), "--to", "meta", "--output", str(merged),
                 "--no-progress"]) == 0
    weights = torch.load(merged / "consolidated.00.pth", weights_only=True)
    assert abs(held_out_loss(base["data"], weights) - ref_valid[3]) <= 1e-5 * ref_valid[3]


def held_out_loss(prefix, weights):
    """Mean response-token loss over the examples `finetune` holds out (its default
    fraction and seed), one example at a time through the reference forward."""
    from megatron_llama.data.sft import SFTExamples, split_indices
    from megatron_llama.training.recipe import TrainConfig

    examples = SFTExamples(prefix)
    _, held_out = split_indices(len(examples), 0.02, TrainConfig(model=CFG).seed)
    total, count = 0.0, 0.0
    for i in held_out:
        ids, mask = (torch.from_numpy(a) for a in examples.example(i))
        logits = reference_logits(weights, CFG, ids[None, :-1])[0]
        ce = torch.nn.functional.cross_entropy(logits.double(), ids[1:], reduction="none")
        total += (ce * mask[1:]).sum().item()
        count += mask[1:].sum().item()
    return total / count


def test_bad_from_is_one_line_and_writes_nothing(base, tmp_path, capsys):
    from megatron_llama.cli import main

    save = tmp_path / "never"
    for extra, message in [
        (["--preset", "7B"], "does not fit --preset 7B (n_layers: checkpoint 4, model 32; "
                             "tok_embeddings.weight: checkpoint "
                             "[512, 64], model [32000, 4096])"),
        (["--dim", "128"], "does not fit the model flags"),
        (["--engine", "deepspeed"], "finetune runs on the megatron engine"),
        (["--lora-rank", "4", "--lora-targets", "wq"], "--lora-targets: unknown ['wq']"),
    ]:
        code = main(["finetune", "--from", base["meta"], "--data", base["data"],
                     "--save", str(save), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not save.exists()
    result = run_cli("finetune", "--from", str(tmp_path), "--data", base["data"], ok=False)
    assert result.returncode == 2 and "unknown checkpoint format" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_recipe_defaults_are_alpacas(base):
    """No optimizer or batch flag given: the Alpaca recipe (lr 2e-5, 3 epochs over the rows,
    3 % warmup rounded up, cosine to 0, 128 rows, seq 512 capped by the model, AdamW
    0.9/0.999 without decay); llama-i's on request; explicit flags win."""
    import math

    from megatron_llama.cli import build_parser
    from megatron_llama.data.sft import SFTData
    from megatron_llama.finetune.commands import finetune_config_from_args

    def config(*extra):
        args = build_parser().parse_args(["finetune", "--from", base["meta"], "--data",
                                          base["data"], *extra])
        return finetune_config_from_args(args)

    cfg, opts = config()
    rows = len(SFTData(base["data"], seq_length=256, global_batch=128, micro_batch=1,
                       valid_fraction=0.02, seed=cfg.seed).train_rows)
    assert (cfg.lr, cfg.global_batch, cfg.seq_length) == (2e-5, 128, CFG.max_seq_len)
    assert (cfg.weight_decay, cfg.min_lr_ratio, cfg.adam_beta1, cfg.adam_beta2) == (
        0.0, 0.0, 0.9, 0.999)
    assert cfg.train_steps == math.ceil(3 * rows / 128) and opts.epochs == 3.0
    assert cfg.warmup_steps == math.ceil(0.03 * cfg.train_steps)
    assert cfg.tokenizer.endswith("tokenizer.model") and opts.packed and opts.lora is None
    cfg, opts = config("--recipe", "llama-i", "--lr", "3e-5", "--epochs", "2")
    assert (cfg.lr, cfg.global_batch, cfg.weight_decay, cfg.adam_beta2) == (3e-5, 64, 0.1, 0.95)
    assert opts.epochs == 2.0 and cfg.min_lr_ratio == 0.1
