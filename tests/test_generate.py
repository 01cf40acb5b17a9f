"""Generation with megatron-core's KV cache: equals recomputing the paper-reference forward."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_llama.generate import Sampling, generate_ids, load_model, sample_next
from megatron_llama.local_ranks import run_processes
from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights, reference_logits
from tests.test_convert_meta import write_by_hand

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                  max_seq_len=48)
PROMPT = [1, 17, 250, 3, 99, 402]


def reference_greedy(weights, n):
    """Greedy continuation recomputing the full reference forward at every step (no cache)."""
    ids = list(PROMPT)
    for _ in range(n):
        logits = reference_logits(weights, CFG, torch.tensor([ids]))
        ids.append(int(torch.argmax(logits[0, -1])))
    return ids[len(PROMPT):]


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    weights = random_meta_weights(CFG, seed=5)
    return write_by_hand(str(tmp_path_factory.mktemp("gen") / "meta"), CFG, weights, 2), weights


def test_kv_cached_greedy_equals_reference(megatron_single, meta_dir):
    from megatron_llama.parallel import destroy

    directory, weights = meta_dir
    model, cfg, _ = load_model(directory)
    try:
        ids = generate_ids(model, cfg, PROMPT, Sampling(max_new_tokens=12))
    finally:
        destroy()
    assert ids == reference_greedy(weights, 12)


def test_generation_from_a_megatron_checkpoint(megatron_single, meta_dir, tmp_path):
    from megatron_llama.convert.run import convert
    from megatron_llama.parallel import destroy

    directory, weights = meta_dir
    convert(directory, str(tmp_path / "mcore"), "megatron", progress=False)
    model, cfg, _ = load_model(str(tmp_path / "mcore"))
    try:
        ids = generate_ids(model, cfg, PROMPT, Sampling(max_new_tokens=8))
    finally:
        destroy()
    assert ids == reference_greedy(weights, 8)


def test_top_p_sampling():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    greedy = Sampling(temperature=0.0)
    assert sample_next(logits, greedy, g) == 0
    nucleus = Sampling(temperature=1.0, top_p=0.6)  # keeps {0, 1}: 0.5 < 0.6 <= 0.8
    draws = [sample_next(logits, nucleus, g) for _ in range(400)]
    assert set(draws) == {0, 1} and 0.5 < draws.count(0) / 400 < 0.75
    assert all(sample_next(logits, Sampling(temperature=1.0, top_p=0.01), g) == 0
               for _ in range(20))


def tp2_worker(rank, world, workdir, directory):
    from megatron_llama.parallel import destroy

    model, cfg, _ = load_model(directory, tp=2)
    try:
        greedy = generate_ids(model, cfg, PROMPT, Sampling(max_new_tokens=12))
        sampled = generate_ids(model, cfg, PROMPT, Sampling(max_new_tokens=12, temperature=0.8,
                                                             seed=3))
    finally:
        destroy()
    return {"greedy": greedy, "sampled": sampled}


@pytest.mark.multiprocess
def test_tensor_parallel_generation_agrees(meta_dir, tmp_path):
    directory, weights = meta_dir
    results = run_processes(tp2_worker, 2, str(tmp_path), directory, timeout=300)
    assert results[0]["greedy"] == results[1]["greedy"] == reference_greedy(weights, 12)
    assert results[0]["sampled"] == results[1]["sampled"]  # ranks draw the same tokens


@pytest.mark.slow
def test_generate_cli_from_meta_directory(tmp_path):
    from megatron_llama.data.corpus import build_builtin_corpus
    from megatron_llama.data.tokenizer import train_tokenizer

    corpus = build_builtin_corpus(str(tmp_path / "corpus"), max_code_bytes=1 << 18)
    weights = random_meta_weights(CFG, seed=5)
    directory = write_by_hand(str(tmp_path / "meta"), CFG, weights, 1)
    train_tokenizer([corpus["prose"]], os.path.join(directory, "tokenizer"), vocab_size=512)
    result = subprocess.run([sys.executable, "-m", "megatron_llama.cli", "generate", "--checkpoint",
                             directory, "--prompt", "The lambda", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The lambda") and len(result.stdout.strip()) > len("The lambda")


def test_generation_from_a_hugging_face_directory(megatron_single, meta_dir, tmp_path):
    from megatron_llama.convert.run import convert, detect_format
    from megatron_llama.errors import ConfigError
    from megatron_llama.parallel import destroy

    directory, weights = meta_dir
    convert(directory, str(tmp_path / "hf"), "hf", progress=False)
    model, cfg, _ = load_model(str(tmp_path / "hf"))
    try:
        ids = generate_ids(model, cfg, PROMPT, Sampling(max_new_tokens=8))
    finally:
        destroy()
    assert ids == reference_greedy(weights, 8)
    # an iteration folder instead of the checkpoint root: the root is suggested
    convert(directory, str(tmp_path / "mcore"), "megatron", progress=False)
    with pytest.raises(ConfigError, match=f"one iteration of a checkpoint; pass the "
                                          f"checkpoint's root {tmp_path / 'mcore'}"):
        detect_format(str(tmp_path / "mcore" / "iter_0000000"))


def test_generate_refuses_more_ranks_than_the_host_has(capsys):
    import os

    from megatron_llama import cli

    assert cli.main(["generate", "--checkpoint", "x", "--prompt", "a", "--tp", "64"]) == 2
    err = capsys.readouterr().err
    assert err == (f"megatron-llama generate: error: --tp 64: this CPU host has "
                   f"{os.cpu_count()} core(s); at most --tp {os.cpu_count()} (one process per "
                   "core)\n")


def test_llama3_chat_generation_stops_at_eot(megatron_single, tmp_path):
    """A Llama 3-style checkpoint (tiktoken tokenizer.model): --chat renders the header/eot
    format and greedy decoding stops at <|eot_id|>, as the cache-free reference does."""
    from megatron_llama.data.chat import encode_chat
    from megatron_llama.data.tiktoken_bpe import write_rank_file
    from megatron_llama.data.tokenizer import Tokenizer
    from megatron_llama.generate import generate_text

    weights = random_meta_weights(CFG, seed=7)
    directory = write_by_hand(str(tmp_path / "meta"), CFG, weights, 1)
    # 256 byte ranks + 256 specials = CFG's 512-token vocabulary
    write_rank_file(os.path.join(directory, "tokenizer.model"), [bytes([b]) for b in range(256)])
    tok = Tokenizer(os.path.join(directory, "tokenizer.model"))
    eot = tok.special_id("<|eot_id|>")
    prompt = encode_chat(tok, [{"role": "user", "content": "Name a camelid."}])
    assert prompt[0] == tok.bos_id  # ... assistant<|end_header_id|>\n\n (bytes only: no merges)
    assert prompt[-3:] == [tok.special_id("<|end_header_id|>"), 10, 10]
    # make <|eot_id|> the likeliest token after a few steps: its output row copies the row of
    # the token greedy decoding picks third, scaled up
    ids = list(prompt)
    for _ in range(3):
        ids.append(int(torch.argmax(reference_logits(weights, CFG, torch.tensor([ids]))[0, -1])))
    weights["output.weight"][eot] = 1.5 * weights["output.weight"][ids[-1]]
    write_by_hand(directory, CFG, weights, 1)
    expected, ids = [], list(prompt)
    while len(expected) < 16:
        expected.append(int(torch.argmax(reference_logits(weights, CFG, torch.tensor([ids]))[0, -1])))
        ids.append(expected[-1])
        if expected[-1] in tok.stop_ids:
            break
    assert expected[-1] == eot and len(expected) < 16  # the stop is reached, so it is tested
    text = generate_text(directory, "Name a camelid.", Sampling(max_new_tokens=16), chat=True)
    assert text == tok.decode(expected[:-1])
