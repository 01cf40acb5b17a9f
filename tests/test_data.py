"""Tokenizer, preprocessing, blends and the built-in corpus, on real SentencePiece/megatron-core."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from megatron_llama.data.blend import load_blend
from megatron_llama.data.corpus import build_builtin_corpus
from megatron_llama.data.indexed import IndexedDatasetWriter, document_count
from megatron_llama.data.preprocess import preprocess
from megatron_llama.data.tokenizer import Tokenizer, train_tokenizer
from megatron_llama.errors import ConfigError

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return build_builtin_corpus(str(out), max_code_bytes=1 << 20)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    model = train_tokenizer([corpus["code"], corpus["prose"]], prefix, vocab_size=2000)
    return Tokenizer(model)


def read_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


# ---- tokenizer --------------------------------------------------------------------------------
ROUND_TRIP = ["plain ascii text", "  two leading spaces", "trailing spaces   ", "tabs\tand\t\ttabs",
              "runs of     spaces", "new\nlines\n\n", "naïve café Ünïcödé", "emoji 🙂🚀👩‍👩‍👧",
              "中文字符和日本語のテキスト", "한국어", "math ∑ ∫ ≤ ≥", "mixed 12 ½ 3.14e-10",
              "\u200bzero width", "e\u0301 combining, ﬁ ligature", "def f(x):\n    return x  # c"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.pad_id == -1 and tokenizer.vocab_size == 2000
    assert tokenizer.encode("hi", bos=True, eos=True)[0] == 1
    assert tokenizer.encode("hi", bos=True, eos=True)[-1] == 2


def test_numbers_split_into_digits(tokenizer):
    ids = tokenizer.encode("in 2023 there were 1234567 tokens and 99 lines")
    digit_pieces = [tokenizer.id_to_piece(i).lstrip("▁") for i in ids]
    digit_pieces = [p for p in digit_pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "2023123456799"
    assert all(len(p) == 1 for p in digit_pieces)


def test_unseen_characters_become_bytes(tokenizer):
    text = "ᚠᛇᚻ"  # runic: not in the training corpus
    ids = [i for i in tokenizer.encode(text) if tokenizer.id_to_piece(i) != "▁"]
    assert all(tokenizer.is_byte(i) for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert 0 not in ids  # never <unk>


def test_bad_tokenizer_file_is_one_line(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        Tokenizer(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer(str(tmp_path / "missing.model"))


def test_tokenizer_training_sentencepiece_refusal_is_one_line(tmp_path):
    """Too little text for the vocabulary: SentencePiece's RuntimeError becomes one line
    naming the input, and no tokenizer files appear."""
    from megatron_llama.data.tokenizer import train_tokenizer

    text = tmp_path / "tiny.txt"
    text.write_text("hello world\nfoo bar baz\n")
    with pytest.raises(ConfigError, match=r"tiny\.txt: SentencePiece could not train a "
                                          r"2000-token vocabulary: .*[Vv]ocab") as err:
        train_tokenizer([str(text)], str(tmp_path / "out" / "tok"), vocab_size=2000)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "out").glob("tok*"))


# ---- preprocessing ----------------------------------------------------------------------------
def test_dataset_equals_tokenization_for_any_worker_count(corpus, tokenizer, tmp_path):
    texts = [json.loads(line)["text"] for line in open(corpus["prose"], encoding="utf-8")]
    expected = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    one = preprocess([corpus["prose"]], str(tmp_path / "one"), tokenizer.model_path,
                     workers=1, progress=False)
    two = preprocess([corpus["prose"]], str(tmp_path / "two"), tokenizer.model_path,
                     workers=2, progress=False)
    assert one.documents == two.documents == len(texts) and one.bad_total == 0
    assert one.tokens == sum(map(len, expected))
    assert read_dataset(str(tmp_path / "one")) == expected
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()
    assert document_count(str(tmp_path / "two")) == len(texts)


def write_messy_inputs(tmp_path):
    lines = [
        b'{"text": "first good document"}',
        b'{"text": "broken json"',
        b'{"content": "no text field"}',
        b'{"text": 42}',
        b'{"text": "bad utf8 \xff\xfe here"}',
        b'{"text": "   "}',
        b'',
        b'{"text": "second good \\u00e9 document", "meta": 1}',
    ]
    jsonl = tmp_path / "messy.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    gz = tmp_path / "more.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b'{"text": "third good"}\nnot json at all\n{"text": "fourth good"}\n')
    txt = tmp_path / "plain.txt"
    txt.write_bytes(b"fifth good line\n\nsixth good line\n\xc3\x28 invalid\n")
    return [str(jsonl), str(gz), str(txt)]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_records_skipped_counted_and_reported(tokenizer, tmp_path, workers):
    inputs = write_messy_inputs(tmp_path)
    prefix = str(tmp_path / f"out{workers}")
    stats = preprocess(inputs, prefix, tokenizer.model_path, workers=workers, progress=False)
    good = ["first good document", "second good é document", "third good", "fourth good",
            "fifth good line", "sixth good line"]
    assert read_dataset(prefix) == [tokenizer.encode(t) + [2] for t in good]
    assert dict(stats.bad) == {"invalid JSON": 2, "missing text field 'text'": 1,
                               "text field 'text' is not a string": 1, "invalid UTF-8": 2,
                               "empty text": 1, "empty line": 1}
    report = open(prefix + ".skipped.txt", encoding="utf-8").read().splitlines()
    assert len(report) == 8
    assert f"{inputs[0]}:2: invalid JSON" in report[0]
    assert report[3].startswith(f"{inputs[0]}:5: invalid UTF-8")
    assert any(r.startswith(f"{inputs[1]}:2: invalid JSON") for r in report)
    # a blank line of a .txt file separates documents: it is not a bad record
    assert not any(r.startswith(f"{inputs[2]}:2:") for r in report)


def test_failure_leaves_no_output(tokenizer, tmp_path):
    truncated = tmp_path / "cut.jsonl.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(b'{"text": "a"}\n' * 20000)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ConfigError, match="cut.jsonl.gz: cannot read") as err:
        preprocess([str(truncated)], str(tmp_path / "out"), tokenizer.model_path, progress=False)
    assert "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["cut.jsonl.gz"]  # no output, no temp files
    with pytest.raises(ConfigError, match="unknown input format"):
        preprocess([str(tmp_path / "x.csv")], str(tmp_path / "o"), tokenizer.model_path)


# ---- blends -----------------------------------------------------------------------------------
def test_paper_mixture_config():
    blend = load_blend(os.path.join(EXAMPLES, "data", "llama_mixture.yaml"))
    table1 = {"CommonCrawl": (67.0, 1.10), "C4": (15.0, 1.06), "Github": (4.5, 0.64),
              "Wikipedia": (4.5, 2.45), "Books": (4.5, 2.23), "ArXiv": (2.5, 1.06),
              "StackExchange": (2.0, 1.03)}
    assert {s.name: (s.weight, s.epochs) for s in blend.sources} == table1
    assert abs(sum(blend.weights) - 1.0) < 1e-12


def test_token_share_per_source_matches_weights(megatron_single, tmp_path):
    from megatron_llama.data.blend import build_gpt_datasets

    rng = np.random.default_rng(0)
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    for k, name in enumerate(weights):  # source k uses token ids [100k + 3, 100k + 99]
        with IndexedDatasetWriter(str(tmp_path / name)) as w:
            for _ in range(400):
                w.add_document(np.append(rng.integers(100 * k + 3, 100 * k + 100,
                                                      rng.integers(20, 200)), 2))
            w.finalize()
    (tmp_path / "blend.yaml").write_text("split: '98,1,1'\nsources:\n" + "".join(
        f"  - {{name: {n}, prefix: {n}, weight: {w}}}\n" for n, w in weights.items()))
    train, valid, _ = build_gpt_datasets(load_blend(str(tmp_path / "blend.yaml")), vocab_size=300,
                                         eod=2, seq_length=64, samples=(6000, 50, 10),
                                         cache_dir=str(tmp_path / "cache"))
    counts = np.zeros(3)
    for i in range(len(train)):
        tokens = train[i]["tokens"].numpy()
        source = np.unique(tokens[tokens != 2] // 100)
        assert len(source) == 1  # every sample comes from one source
        counts[source[0]] += len(tokens)
    shares = counts / counts.sum()
    for share, weight in zip(shares, weights.values()):
        assert abs(share - weight) <= 0.01, (shares, weights)
    assert len(valid) >= 50


@pytest.mark.parametrize("content, message", [
    ("sources: [", "not valid YAML"),
    ("sources: []", "non-empty 'sources'"),
    ("sources:\n  - {prefix: a, weight: 0}", "weights must be > 0"),
    ("sources:\n  - {prefix: a}", "needs 'prefix' and 'weight'"),
    ("split: '1,2'\nsources:\n  - {prefix: a, weight: 1}", "split must be three numbers"),
])
def test_blend_errors(tmp_path, content, message):
    path = tmp_path / "blend.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_blend(str(path))
    assert str(path) in str(err.value)


def test_blend_refuses_missing_data_and_empty_splits(tmp_path):
    (tmp_path / "b.yaml").write_text("sources:\n  - {name: s, prefix: s, weight: 1}\n")
    with pytest.raises(ConfigError, match="s.bin not found .run `megatron-llama preprocess"):
        load_blend(str(tmp_path / "b.yaml")).check_files()
    with IndexedDatasetWriter(str(tmp_path / "s")) as w:
        for _ in range(5):
            w.add_document(np.array([5, 6, 2]))
        w.finalize()
    with pytest.raises(ConfigError, match="has 5 documents, none in its valid split"):
        load_blend(str(tmp_path / "b.yaml")).check_files()


# ---- built-in corpus --------------------------------------------------------------------------
def test_builtin_corpus(corpus):
    code = [json.loads(line) for line in open(corpus["code"], encoding="utf-8")]
    prose = [json.loads(line) for line in open(corpus["prose"], encoding="utf-8")]
    assert len(code) > 20 and all(d["source"].endswith(".py") for d in code)
    assert sum(len(d["text"].encode()) for d in code) <= 1 << 20
    assert len(prose) > 50 and any("lambda" in d["text"] for d in prose)
    blend = load_blend(corpus["blend"])
    assert [s.name for s in blend.sources] == ["code", "prose"]
