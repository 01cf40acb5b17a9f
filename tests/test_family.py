"""Every generation end to end at a tiny shape: its tokenizer trained here, preprocess,
`pretrain` (TP=2 for the GQA ones), convert to Meta's format and Hugging Face's, logits in
transformers equal to the paper-reference forward, and back to Megatron bit for bit.

- Llama 2: GQA (2 KV heads), norm_eps 1e-5, SentencePiece.
(Code Llama's rope_theta 1e6 and ffn_dim_multiplier are covered by the conversion tests,
`test_convert_megatron.py::codellama-tp4pp2`, and its preset by `test_config.py`.)
- Llama 3.1: GQA, rope_theta 5e5 with scaled RoPE, a tiktoken BPE rank file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_llama.convert.meta import MetaCheckpoint
from megatron_llama.convert.run import convert
from megatron_llama.data.corpus import pydoc_documents
from tests.llama_testing import reference_logits
from tests.test_convert_meta import read_by_hand

transformers = pytest.importorskip("transformers")

SHAPE = ["--preset", "tiny", "--dim", "128", "--n-layers", "2", "--n-heads", "4",
         "--norm-eps", "1e-5", "--multiple-of", "32"]
GENERATIONS = {
    "llama2": dict(model=["--n-kv-heads", "2"], tokenizer="sentencepiece", tp=2),
    "llama3.1": dict(model=["--n-kv-heads", "2", "--rope-theta", "500000", "--use-scaled-rope"],
                     tokenizer="tiktoken", tp=2),
}
EXPECTED_PARAMS = {  # fields params.json must carry for each generation
    "llama2": {"n_kv_heads": 2, "norm_eps": 1e-5},
    "llama3.1": {"n_kv_heads": 2, "rope_theta": 500000.0, "use_scaled_rope": True},
}


def run_cli(*args, timeout=600):
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", *args],
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline"))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("family") / "prose.jsonl"
    paragraphs = [p for d in pydoc_documents() for p in d["text"].split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:1500]))
    return path


@pytest.mark.multiprocess
@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_generation_end_to_end(generation, corpus, megatron_single, tmp_path):
    from megatron_llama.data.tokenizer import Tokenizer

    spec = GENERATIONS[generation]
    vocab = "1024" if spec["tokenizer"] == "tiktoken" else "512"
    run_cli("train-tokenizer", "--kind", spec["tokenizer"], "--input", str(corpus),
            "--output-prefix", str(tmp_path / "tok"), "--vocab-size", vocab, "--no-progress")
    tokenizer = str(tmp_path / "tok.model")
    tok = Tokenizer(tokenizer)
    assert tok.kind == spec["tokenizer"] and tok.vocab_size == int(vocab)
    run_cli("preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "data"),
            "--tokenizer", tokenizer, "--workers", "2", "--no-progress")
    out = run_cli("pretrain", *SHAPE, *spec["model"], "--tp", str(spec["tp"]),
                  "--nproc-per-node", str(spec["tp"]), "--data", str(tmp_path / "data"),
                  "--tokenizer", tokenizer, "--micro-batch", "2", "--global-batch", "4",
                  "--seq-length", "64", "--train-steps", "3", "--warmup-steps", "1",
                  "--log-interval", "1", "--eval-interval", "0", "--save", str(tmp_path / "ckpt"))
    assert "step      3" in out

    # Megatron -> Meta: the generation's params.json, the tokenizer alongside
    convert(str(tmp_path / "ckpt"), str(tmp_path / "meta"), "meta", progress=False)
    params = json.load(open(tmp_path / "meta" / "params.json"))
    for key, value in EXPECTED_PARAMS[generation].items():
        assert params[key] == value, key
    meta = MetaCheckpoint(str(tmp_path / "meta"))
    cfg = meta.config
    assert cfg.vocab_size == tok.vocab_size and meta.tokenizer
    weights, _ = read_by_hand(str(tmp_path / "meta"))

    # Meta -> Hugging Face: config, tokenizer, logits
    convert(str(tmp_path / "meta"), str(tmp_path / "hf"), "hf", progress=False)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["num_key_value_heads"], config["rope_theta"]) == (cfg.num_kv_heads,
                                                                     cfg.rope_theta)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert (config["rope_scaling"] or {}).get("rope_type") == (
        "llama3" if cfg.use_scaled_rope else None)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                          torch_dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "The while statement is used for repeated execution as long as an expression is true."
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text, bos=True)
    tokens = torch.tensor([ids[:48], ids[-48:]]) if len(ids) >= 48 else torch.tensor([ids])
    with torch.no_grad():
        ours = model(tokens).logits
    expected = reference_logits({k: v.float() for k, v in weights.items()}, cfg, tokens)
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()

    # Hugging Face -> Megatron -> Meta: bit for bit
    convert(str(tmp_path / "hf"), str(tmp_path / "mcore"), "megatron", tp=spec["tp"],
            progress=False)
    convert(str(tmp_path / "mcore"), str(tmp_path / "back"), "meta", progress=False)
    back, _ = read_by_hand(str(tmp_path / "back"))
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], v) for k, v in weights.items())
    assert json.load(open(tmp_path / "back" / "params.json")) == params
