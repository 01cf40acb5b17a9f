"""Tokenizers: SentencePiece BPE trained with the paper's settings, and loading any model.

The paper (section 2.1): byte-pair encoding with SentencePiece, all numbers split into
single digits, unknown UTF-8 characters decomposed into bytes. We also keep the text as is
(identity normalisation, no whitespace collapsing) so decode(encode(text)) == text, and use
LLaMA's special ids: unk=0, bos=1, eos=2, no pad. Meta's released ``tokenizer.model`` is a
SentencePiece model too. `Tokenizer(path)` also loads Llama 3's tiktoken rank file
(`tiktoken_bpe`), detected from the file's content; both kinds share one interface.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from megatron_llama.data.sources import iter_documents
from megatron_llama.errors import ConfigError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def Tokenizer(model_path: str):  # noqa: N802 - reads like the class it returns
    """The tokenizer in ``model_path``, of whichever kind the file is: a SentencePiece model
    (LLaMA-1, Llama 2, Code Llama, our own) or a tiktoken rank file (Llama 3.x)."""
    from megatron_llama.data.tiktoken_bpe import TiktokenTokenizer, looks_like_rank_file

    if not os.path.isfile(model_path):
        raise ConfigError(f"{model_path}: tokenizer model not found")
    try:
        rank_file = looks_like_rank_file(model_path)
    except OSError as e:
        raise ConfigError(f"{model_path}: cannot read the tokenizer ({e.strerror})") from None
    return TiktokenTokenizer(model_path) if rank_file else SentencePieceTokenizer(model_path)


class SentencePieceTokenizer:
    """A SentencePiece model with LLaMA's conventions (bos/eos ids from the model itself)."""

    kind = "sentencepiece"

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{model_path}: not a SentencePiece model nor a tiktoken rank "
                              f"file ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def special_id(self, name: str) -> Optional[int]:
        """The id of control piece ``name`` (``<s>``, ``</s>``), None if there is none."""
        i = self.sp.PieceToId(name)
        return i if self.sp.IsControl(i) else None

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated answer."""
        return [self.eos_id]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Control pieces by name (``<s>``, ``</s>``): what a chat template's text may hold."""
        return {self.sp.IdToPiece(i): i for i in range(self.vocab_size) if self.sp.IsControl(i)}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.Encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def is_byte(self, i: int) -> bool:
        return self.sp.IsByte(int(i))


def _training_sentences(inputs: list[str], text_key: str, max_sentences: int,
                        seed: int, progress: bool = False) -> Iterator[str]:
    """Lines of the input documents, reservoir-sampled to at most ``max_sentences``.

    SentencePiece trains on "sentences"; a document's lines are a good unit for code and
    prose. The sample (not the whole corpus) is held in memory.
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    docs = tqdm(iter_documents(inputs, text_key), unit=" docs", desc="sampling lines",
                disable=not progress)
    for doc in docs:
        for line in doc.text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(sample) < max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    sample[j] = line
    docs.close()
    if not sample:
        raise ConfigError(f"{', '.join(inputs)}: no text to train a tokenizer on")
    return iter(sample)


def train_tokenizer(inputs: list[str], output_prefix: str, vocab_size: int = 32000,
                    text_key: str = "text", max_sentences: int = 2_000_000,
                    character_coverage: float = 0.99995, num_threads: Optional[int] = None,
                    seed: int = 0, progress: bool = False) -> str:
    """Train a LLaMA-style SentencePiece BPE model; returns the path of ``<prefix>.model``.

    Inputs are .txt (one document per line), .jsonl or .jsonl.gz (``text_key`` field).
    Files appear only when training succeeded (written to a temporary prefix, then renamed).
    ``progress`` shows a bar while the input is sampled, then when training starts and ends
    (SentencePiece reports nothing in between that fits a console).
    """
    import sentencepiece as spm

    if vocab_size < 260:
        raise ConfigError(f"vocab_size={vocab_size} is too small: 256 byte tokens + 3 specials "
                          "are always in the vocabulary")
    sentences = _training_sentences(inputs, text_key, max_sentences, seed, progress)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    if progress:
        print(f"training SentencePiece BPE (vocab {vocab_size}) on the sampled lines ...",
              flush=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        tmp_prefix = os.path.join(tmp, "tok")
        try:
            start = time.perf_counter()
            _train_spm(spm, sentences, tmp_prefix, vocab_size, character_coverage, num_threads)
        except RuntimeError as e:
            # e.g. "Vocabulary size too high (300). Please set it to a value <= 265."
            reason = str(e).strip().splitlines()[-1].split("] ")[-1]
            raise ConfigError(f"{', '.join(inputs)}: SentencePiece could not train a "
                              f"{vocab_size}-token vocabulary: {reason}") from None
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, output_prefix + ext)
    if progress:
        print(f"trained in {time.perf_counter() - start:.1f} s", flush=True)
    return output_prefix + ".model"


def train_tiktoken_tokenizer(inputs: list[str], output: str, vocab_size: int = 128256,
                             text_key: str = "text", max_sentences: int = 2_000_000,
                             seed: int = 0, progress: bool = False) -> str:
    """Train a Llama 3-style tokenizer: a tiktoken rank file of ``vocab_size - 256`` byte-level
    BPE tokens (256 special tokens follow them), written to ``output``; returns its path."""
    from megatron_llama.data.tiktoken_bpe import NUM_SPECIAL_TOKENS, train_rank_file

    if vocab_size < 256 + NUM_SPECIAL_TOKENS:
        raise ConfigError(f"vocab_size={vocab_size} is too small: 256 byte tokens + 256 special "
                          "tokens are always in a Llama 3 vocabulary")
    sentences = _training_sentences(inputs, text_key, max_sentences, seed, progress)
    if progress:
        print(f"training byte-level BPE ({vocab_size - NUM_SPECIAL_TOKENS} ranks) ...", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return train_rank_file(sentences, output, vocab_size - NUM_SPECIAL_TOKENS)


def _train_spm(spm, sentences: Iterator[str], prefix: str, vocab_size: int,
               character_coverage: float, num_threads: Optional[int]) -> None:
    """SentencePiece BPE with the paper's settings, trained on ``sentences``."""
    spm.SentencePieceTrainer.Train(
        sentence_iterator=sentences,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        split_digits=True,            # paper: numbers split into single digits
        byte_fallback=True,           # paper: unknown UTF-8 characters -> byte tokens
        normalization_rule_name="identity",  # keep text exactly (no NFKC)
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        character_coverage=character_coverage,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=num_threads or os.cpu_count() or 1,
        train_extremely_large_corpus=False,
        minloglevel=2,  # its INFO log is a line per few merges: too much for a console
    )


def token_dtype(vocab_size: int):
    """Smallest numpy dtype megatron-core's indexed dataset reads for this vocabulary."""
    return np.uint16 if vocab_size < 65500 else np.int32
