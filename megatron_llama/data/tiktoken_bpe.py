"""Llama 3's tokenizer: a tiktoken byte-level BPE rank file plus 256 special tokens.

Meta's Llama 3.x ``tokenizer.model`` is not a SentencePiece model but text, one line per token:
the token's bytes in base64, a space, its rank (= its id). The 128,000 ranks are followed by
256 special tokens with ids from 128,000 (`special_token_names`). Text is first split with
Meta's regular expression (`SPLIT_PATTERN`), then each piece is merged by rank; the
``tiktoken`` package does both (its Rust core). Special-token text inside a document is
encoded as ordinary characters, so a corpus cannot inject control tokens.

The rank file is parsed here rather than with ``tiktoken.load.load_tiktoken_bpe``: that
function caches every file it reads under the path's hash in a temporary directory, so a
changed file at the same path would be read stale.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Iterable, Optional, Sequence

from megatron_llama.errors import ConfigError

# Meta's pre-tokenizer for Llama 3 (case-insensitive contractions, letters with an optional
# leading non-letter, numbers of at most 3 digits, punctuation runs, newlines, spaces).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL_TOKENS = 256
LLAMA3_BOS_ID, LLAMA3_EOS_ID = 128000, 128001  # with Meta's 128,000 ranks
# The named special tokens in id order from the first special id (Llama 3.1's names; Llama 3
# calls 128004, 128008 and 128010 reserved tokens, with the same ids).
NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                  "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")


def special_token_names() -> list[str]:
    """The 256 special tokens in id order: the named ones, then reserved_special_token_3 .."""
    rest = NUM_SPECIAL_TOKENS - len(NAMED_SPECIALS)
    return list(NAMED_SPECIALS) + [f"<|reserved_special_token_{3 + i}|>" for i in range(rest)]


def looks_like_rank_file(path: str) -> bool:
    """True when ``path`` starts like a tiktoken rank file (a ``base64-token rank`` text
    line); SentencePiece models are binary protobuf. A bad line further on is reported by
    `read_rank_file` with its line number."""
    with open(path, "rb") as f:
        first = f.readline(4096).rstrip(b"\r\n")
    parts = first.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def read_rank_file(path: str) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken rank file; ranks must be 0..n-1, each once."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(b" ")
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (binascii.Error, ValueError):
                raise ConfigError(f"{path}:{number}: not a 'base64-token rank' line of a "
                                  "tiktoken rank file") from None
            if token in ranks:
                raise ConfigError(f"{path}:{number}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ConfigError(f"{path}: byte 0x{missing[0]:02x} has no token (a byte-level BPE "
                          "needs all 256 single bytes)")
    return ranks


class TiktokenTokenizer:
    """Llama 3's tokenizer, with the same interface as the SentencePiece `Tokenizer`."""

    kind = "tiktoken"

    def __init__(self, model_path: str):
        import tiktoken

        self.model_path = model_path
        self.ranks = read_rank_file(model_path)
        n = len(self.ranks)
        self.specials = {name: n + i for i, name in enumerate(special_token_names())}
        self.enc = tiktoken.Encoding(name=os.path.basename(model_path), pat_str=SPLIT_PATTERN,
                                     mergeable_ranks=self.ranks, special_tokens=self.specials)

    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + NUM_SPECIAL_TOKENS

    @property
    def bos_id(self) -> int:
        return self.specials["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.specials["<|end_of_text|>"]

    @property
    def unk_id(self) -> int:
        return -1  # byte-level: every text has an encoding

    @property
    def pad_id(self) -> int:
        return -1

    @property
    def special_tokens(self) -> dict[str, int]:
        """The 256 special tokens by name."""
        return dict(self.specials)

    def special_id(self, name: str) -> Optional[int]:
        """The id of special token ``name`` (e.g. ``<|eot_id|>``), None if there is none."""
        return self.specials.get(name)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated answer: end of text, end of turn, end of message."""
        return [self.specials[n] for n in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self.enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    def is_byte(self, i: int) -> bool:
        return len(self.enc.decode_single_token_bytes(int(i))) == 1


def write_rank_file(path: str, tokens: Sequence[bytes]) -> str:
    """Write ``tokens`` (rank = position) as a tiktoken rank file; for tests and tools."""
    from megatron_llama.fileio import atomic_write

    lines = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n"
                     for r, t in enumerate(tokens))
    atomic_write(path, lambda f: f.write(lines), binary=True)
    return path


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: bytes that are printable
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves, the other 68 to U+0100 on."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_rank_file(sentences: Iterable[str], output: str, num_ranks: int) -> str:
    """Learn a byte-level BPE of ``num_ranks`` tokens with Meta's split pattern and write it as
    a tiktoken rank file (the 256 bytes first, then each merge in the order it was learned,
    so tiktoken's lowest-rank-first merging reproduces the learned merges).

    Trained with the ``tokenizers`` library's BPE trainer (Rust). Llama 3 models need a file
    like Meta's; this gives a small one for tests and tiny Llama 3 runs without a download.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if num_ranks < 256:
        raise ConfigError(f"{num_ranks} ranks are too few: the 256 single bytes come first")
    table = byte_to_unicode()
    back = {c: b for b, c in table.items()}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=num_ranks, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2)
    bpe.train_from_iterator(sentences, trainer=trainer)
    # the trainer's threads are done; worker processes forked later (preprocess) need none
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    merges = json.loads(bpe.to_str())["model"]["merges"]
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = bytes(back[c] for c in left + right)
        if token not in seen and len(tokens) < num_ranks:
            seen.add(token)
            tokens.append(token)
    return write_rank_file(output, tokens)
