"""Llama 3's tiktoken rank file as Hugging Face tokenizer files (HF export).

``write_hf_tiktoken_files(rank_file, out_dir)`` writes ``tokenizer.json`` (built with the
``tokenizers`` library), ``tokenizer_config.json`` (with Llama 3's chat template) and
``special_tokens_map.json``, so that ``transformers.AutoTokenizer.from_pretrained(out_dir)``
encodes exactly like `TiktokenTokenizer` with BOS prepended.

How tiktoken's encoder becomes a ``tokenizers`` BPE:
- Pre-tokenization is Meta's split regex (isolated pieces), then GPT-2's byte-to-unicode
  mapping (`byte_to_unicode`), which is how ``tokenizers`` spells raw bytes in a vocabulary.
- tiktoken merges, inside a piece, the adjacent pair whose concatenation has the lowest rank.
  The equivalent merge list holds every split (left, right) of a token into two tokens,
  ordered by the rank of the token they make; ``ignore_merges`` emits a piece that is itself
  a token directly, as tiktoken does.
- The 256 special tokens are added tokens. Unlike the SentencePiece export, special-token text
  is parsed as the special token (``split_special_tokens`` false): that is what chat
  templates rely on, and what Meta's own Hugging Face release does.
"""

from __future__ import annotations

import json
import os
import shutil

from megatron_llama.data.chat import chat_template
from megatron_llama.data.tiktoken_bpe import SPLIT_PATTERN, TiktokenTokenizer, byte_to_unicode


def _merges(ranks: dict[bytes, int], spell) -> list[tuple[str, str]]:
    """Every split of a multi-byte token into two tokens, ordered by the token's rank (then
    by the ranks of its halves, so the order is deterministic)."""
    ranked = []
    for token, rank in ranks.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranks and right in ranks:
                ranked.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(tok: TiktokenTokenizer):
    """The ``tokenizers.Tokenizer`` equivalent of ``tok`` (BOS added by the post-processor)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    table = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {spell(t): r for t, r in tok.ranks.items()}
    hf = Tokenizer(BPE(vocab=vocab, merges=_merges(tok.ranks, spell), ignore_merges=True,
                       fuse_unk=False, byte_fallback=False, dropout=None))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    specials = sorted(tok.specials.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False)
                           for name, _ in specials])
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.bos_id)])
    return hf


def write_hf_tiktoken_files(rank_file: str, out_dir: str, max_length: int = 8192) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and a copy of
    the rank file as ``tokenizer.model`` (what Meta's release calls it)."""
    tok = TiktokenTokenizer(rank_file)
    hf = build_hf_tokenizer(tok)
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # byte-level: decoding is exact as it is
        "model_max_length": max_length,
        "chat_template": chat_template("llama3"),
        "model_input_names": ["input_ids", "attention_mask"],
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model")]
    hf.save(paths[0])
    for path, obj in ((paths[1], config), (paths[2], special)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    if os.path.abspath(rank_file) != os.path.abspath(paths[3]):
        shutil.copyfile(rank_file, paths[3])
    return paths
