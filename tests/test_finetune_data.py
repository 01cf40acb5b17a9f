"""Instruction data: Alpaca's prompt, chat formats, the loss mask, and `finetune-data`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_llama.data.corpus import pydoc_documents
from megatron_llama.data.instructions import (
    BadExample,
    fit_length,
    tokenize_alpaca,
    tokenize_chat,
    tokenize_record,
)
from megatron_llama.data.tokenizer import Tokenizer, train_tokenizer
from megatron_llama.errors import ConfigError

# Alpaca's prompts as published (Taori et al. 2023), written out here as the golden text
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\nName a camelid."
                   "\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                "provides further context. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\nReverse the word.\n\n### Input:\nllama\n\n"
                "### Response:\n")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ftspm") / "prose.txt"
    paragraphs = [p for d in pydoc_documents() for p in d["text"].split("\n\n") if p.strip()]
    path.write_text("\n".join(paragraphs[:600]))
    return Tokenizer(train_tokenizer([str(path)], str(path.with_suffix("")), vocab_size=700))


@pytest.fixture(scope="module")
def tik(tmp_path_factory):
    from megatron_llama.data.tiktoken_bpe import train_rank_file

    paragraphs = [p for d in pydoc_documents() for p in d["text"].split("\n\n") if p.strip()]
    return Tokenizer(train_rank_file(paragraphs[:600], str(tmp_path_factory.mktemp("fttik")
                                                           / "tokenizer.model"), 768))


def test_alpaca_prompt_and_mask(spm):
    from megatron_llama.data.instructions import alpaca_prompt

    assert alpaca_prompt({"instruction": "Name a camelid.", "output": "Llama"})[0] == ALPACA_NO_INPUT
    assert alpaca_prompt({"instruction": "Reverse the word.", "input": "llama",
                          "output": "amall"})[0] == ALPACA_INPUT
    ids, mask = tokenize_alpaca(spm, {"instruction": "Name a camelid.", "input": "",
                                      "output": "The llama."})
    assert ids[0] == spm.bos_id and ids[-1] == spm.eos_id and len(ids) == len(mask)
    start = mask.index(1)
    assert mask == [0] * start + [1] * (len(ids) - start)  # one response span, EOS included
    assert spm.decode(ids[1:start]) + spm.decode(ids[start:-1]) == ALPACA_NO_INPUT + "The llama."
    assert ids[:start] == spm.encode(ALPACA_NO_INPUT, bos=True)[:start]


def test_llama3_chat_mask_is_the_assistant_turns(tik):
    n = 768
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a camelid."},
                {"role": "assistant", "content": "The llama."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "The alpaca."}]
    ids, mask = tokenize_chat(tik, {"messages": messages})
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == tik.encode("The llama.") + [n + 9] + tik.encode("The alpaca.") + [n + 9]
    assert ids[0] == n and ids.count(n + 9) == 5  # every message ends with <|eot_id|>


def test_llama2_chat_mask_is_the_answers(spm):
    messages = [{"role": "user", "content": "Name a camelid."},
                {"role": "assistant", "content": "The llama."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "The alpaca."}]
    ids, mask = tokenize_chat(spm, {"messages": messages})
    spans, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    spans.append(current) if current else None
    assert [spm.decode(s[:-1]).strip() for s in spans] == ["The llama.", "The alpaca."]
    assert all(s[-1] == spm.eos_id for s in spans)  # each answer's </s> is trained


@pytest.mark.parametrize("record, reason", [
    ({"instruction": "Do it.", "output": ""}, "no response"),
    ({"instruction": "Do it."}, "no response"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no response"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "roles must alternate"),
    ({"text": "plain"}, "neither 'instruction'"),
    (["a list"], "not a JSON object"),
])
def test_unusable_records(spm, record, reason):
    with pytest.raises(BadExample, match=reason):
        tokenize_record(spm, record)


def test_overlong_examples():
    ids, mask = list(range(10)), [0] * 6 + [1] * 4
    assert fit_length(ids, mask, 10, "drop") == (ids, mask)
    assert fit_length(ids, mask, 8, "drop") is None
    assert fit_length(ids, mask, 8, "truncate") == (ids[:8], mask[:8])
    assert fit_length(ids, mask, 5, "truncate") is None  # nothing of the response is left


def read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_finetune_data_command(spm, tmp_path, capsys):
    from megatron_llama.cli import main
    from megatron_llama.data.corpus import build_builtin_corpus

    corpus = build_builtin_corpus(str(tmp_path / "corpus"), max_code_bytes=1 << 16)
    bad = tmp_path / "bad.jsonl"
    good = {"instruction": "Name a camelid.", "output": "The llama."}
    bad.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"instruction": "x"}),
                              "", json.dumps({"messages": [{"role": "user", "content": "a"}]}),
                              json.dumps({"instruction": "Long.", "output": "word " * 400})])
                   + "\n")
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([good, {"instruction": "y", "output": ""}]))
    prefix = str(tmp_path / "sft")
    base = ["finetune-data", "--input", corpus["alpaca"], corpus["chat"], str(bad), str(array),
            "--tokenizer", spm.model_path, "--max-tokens", "256", "--no-progress"]
    assert main(base + ["--output-prefix", prefix, "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "403 examples" in out and "1 truncated" in out  # 320 + 80 + 2 + 1 (array)
    assert "skipped 5 bad record(s)" in out
    for where in (f"{bad}:2: invalid JSON", f"{bad}:3: no response", f"{bad}:4: blank line",
                  f"{bad}:5: no response", f"{array}:[1]: no response"):
        assert where in out, where
    tokens, masks = read(prefix), read(prefix + ".mask")
    assert len(tokens) == len(masks) == 403
    assert [len(t) for t in tokens] == [len(m) for m in masks]
    records = [json.loads(line) for line in open(corpus["alpaca"])]
    assert (tokens[7], masks[7]) == tokenize_record(spm, records[7])
    assert max(len(t) for t in tokens) == 256
    # one worker writes the same files
    assert main(base + ["--output-prefix", prefix + "1", "--workers", "1"]) == 0
    assert read(prefix + "1") == tokens and read(prefix + "1.mask") == masks
    # --overlong drop
    capsys.readouterr()
    assert main(base + ["--output-prefix", prefix + "d", "--overlong", "drop"]) == 0
    assert "0 truncated, 1 dropped as too long" in capsys.readouterr().out


def test_bad_chat_template_is_one_line_and_writes_nothing(spm, tmp_path, capsys):
    from megatron_llama.cli import main

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    code = main(["finetune-data", "--input", str(data), "--tokenizer", spm.model_path,
                 "--output-prefix", str(tmp_path / "o"), "--chat-template", str(template)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"megatron-llama finetune-data: error: {template}: chat "
                                        "template does not parse") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "t.jinja"]
    with pytest.raises(ConfigError, match="a .json input must hold a list"):
        from megatron_llama.data.finetune_data import finetune_data

        (tmp_path / "x.json").write_text("{}")
        finetune_data([str(tmp_path / "x.json")], str(tmp_path / "o"), spm.model_path)
    assert not (tmp_path / "o.bin").exists()
    assert np.uint8  # the mask dtype used
