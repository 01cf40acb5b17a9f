"""A SentencePiece BPE ``tokenizer.model`` as Hugging Face tokenizer files (HF export).

``write_hf_tokenizer_files(sp_model_path, out_dir)`` writes ``tokenizer.json`` (built with the
``tokenizers`` library from the model's own pieces, scores and normalizer spec),
``tokenizer_config.json``, ``special_tokens_map.json`` and a copy of ``tokenizer.model``, so that
``transformers.AutoTokenizer.from_pretrained(out_dir)`` encodes exactly like SentencePiece (BOS
prepended) and decodes back the same text, in transformers 4.x and 5.x alike.

Why not just ``tokenizer.model`` + ``"tokenizer_class": "LlamaTokenizer"``: transformers 5.x
rebuilds that class around a ``Metaspace`` pre-tokenizer, which adds SentencePiece's dummy
prefix only when the text does not already start with a space: ``" leading"`` then encodes
like ``"leading"``. Here the prefix is a normalizer step (always added, as SentencePiece
does), the class is the generic ``PreTrainedTokenizerFast`` (which loads ``tokenizer.json``
as written), and ``split_special_tokens`` makes a literal ``<s>`` in text characters, as in
SentencePiece. Known difference: decoding an id list cut inside a multi-byte character gives
U+FFFD for every byte of the cut character run (SentencePiece keeps the complete ones).

Needs ``sentencepiece`` (its protobuf schema) and ``tokenizers``; not ``transformers``.
"""

from __future__ import annotations

import json
import os
import re
import shutil

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # "▁", SentencePiece's whitespace escape


def _load_proto(sp_model_path: str):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # needs protobuf

    proto = model_pb2.ModelProto()
    with open(sp_model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's BPE encoder.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is a piece with the
    highest score; ``tokenizers`` joins the pair with the lowest merge rank. So every split
    (left, right) of a normal piece into two normal pieces becomes a merge, ranked by the
    merged piece's score (highest first), then its id. Control, byte, unknown, unused and
    user-defined pieces are never produced by merges.
    """
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(sp_model_path: str):
    """The ``tokenizers.Tokenizer`` equivalent of a SentencePiece BPE model (BOS added)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    proto = _load_proto(sp_model_path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise ValueError(f"{sp_model_path}: only SentencePiece BPE models are supported "
                         f"(model_type={trainer.model_type})")
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{sp_model_path}: treat_whitespace_as_suffix is not supported")

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk_piece = proto.pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
    user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    # ignore_merges (a pre-tokenized chunk that is a whole vocabulary entry is emitted as is) is
    # only turned on for user-defined pieces, which are isolated below and have no merges; as in
    # transformers 5.x's own converter. Its side effect: a chunk next to a user-defined piece
    # that spells "</s>" or "<0x41>" becomes that token. The project's models have none.
    tok = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=unk_piece,
                        fuse_unk=True, byte_fallback=trainer.byte_fallback, dropout=None,
                        ignore_merges=bool(user)))

    # Normalizer, in SentencePiece's order: character map, extra-whitespace removal, dummy
    # prefix, whitespace escaping. Prepend is a *normalizer* on purpose: it always adds "▁"
    # (except to an empty string), like SentencePiece. The Metaspace pre-tokenizer that
    # transformers' LlamaTokenizer uses skips the prefix when the text starts with a space.
    seq = []
    if norm.precompiled_charsmap:
        seq.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        seq += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        seq.append(normalizers.Prepend(_SPACE))
    if norm.escape_whitespaces:
        seq.append(normalizers.Replace(" ", _SPACE))
    tok.normalizer = normalizers.Sequence(seq)
    # SentencePiece runs BPE over the whole normalised text, except that user-defined pieces
    # are matched first (longest first) and emitted whole.
    if user:
        pattern = "|".join(re.escape(u) for u in sorted(user, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    else:
        tok.pre_tokenizer = None

    # Control pieces (<s>, </s>; <unk> too) are special added tokens so that
    # skip_special_tokens works; tokenizer_config sets split_special_tokens so a literal "<s>"
    # in the text is encoded as characters, as SentencePiece does.
    specials = [p.piece for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    if trainer.bos_id >= 0:
        bos = proto.pieces[trainer.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, trainer.bos_id)])

    dec = [decoders.Replace(_SPACE, " ")]
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok, proto


def write_hf_tokenizer_files(sp_model_path: str, out_dir: str) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model."""
    tok, proto = build_hf_tokenizer(sp_model_path)
    trainer = proto.trainer_spec
    os.makedirs(out_dir, exist_ok=True)

    def piece(i):
        return proto.pieces[i].piece if i >= 0 else None

    special = {k: v for k, v in (("bos_token", piece(trainer.bos_id)),
                                 ("eos_token", piece(trainer.eos_id)),
                                 ("unk_token", piece(trainer.unk_id)),
                                 ("pad_token", piece(trainer.pad_id))) if v is not None}
    config = {
        # Not "LlamaTokenizer": transformers 5.x's LlamaTokenizer keeps only vocab/merges from
        # tokenizer.json and rebuilds a Metaspace pre-tokenizer that drops SentencePiece's dummy
        # prefix on text starting with a space. PreTrainedTokenizerFast (an alias of
        # TokenizersBackend in 5.x) loads tokenizer.json as written, in 4.x and 5.x.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": trainer.bos_id >= 0,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" in text -> characters, like SentencePiece
        "clean_up_tokenization_spaces": False,  # keep " ." / " 's" etc. on decode
        "padding_side": "left",
    }
    paths = [os.path.join(out_dir, n) for n in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model")]
    tok.save(paths[0])
    for path, obj in ((paths[1], config), (paths[2], special)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    if os.path.abspath(sp_model_path) != os.path.abspath(paths[3]):
        shutil.copyfile(sp_model_path, paths[3])
    return paths


if __name__ == "__main__":
    import sys

    print("\n".join(write_hf_tokenizer_files(sys.argv[1], sys.argv[2])))
