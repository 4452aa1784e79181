"""Training tokenizers on code: byte-level BPE (HF tokenizers) and SentencePiece (unigram).

Both round-trip any text exactly: BPE works on bytes; SentencePiece is trained with identity
normalisation, whitespace kept, and byte fallback for characters it never saw.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from codex_ml.tokenizer.core import CodeTokenizer, SpecialTokens


def train_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int, specials: SpecialTokens, min_frequency: int = 2
) -> CodeTokenizer:
    """A tokenizer of ``vocab_size`` tokens in all, special tokens included."""
    if kind == "bpe":
        backend = train_bpe(texts, vocab_size, specials.all(), min_frequency)
    elif kind == "sentencepiece":
        backend = train_sentencepiece(texts, vocab_size, specials.all())
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: bpe, sentencepiece")
    # Serialise once, so the tokenizer in memory is exactly the one a reload gives (same hash).
    backend = Tokenizer.from_str(backend.to_str())
    return CodeTokenizer(backend, specials.eos, specials.pad, kind=kind)


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def train_sentencepiece(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """Train with the sentencepiece library, then express the model as a ``tokenizers`` Unigram."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    texts = list(texts)
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in texts), default=1)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=proto,
        model_type="unigram",
        vocab_size=vocab_size - len(special_tokens),
        # Exactness: no normalisation, whitespace kept as it is, unknown characters as bytes.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # Documents are whole files; line breaks and tabs must be pieces, not bytes.
        user_defined_symbols=["\n", "\t", "\r"],
        max_sentence_length=max(longest, 4192),
        character_coverage=0.9995,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    # the protobuf module builds its classes at import time: no attributes for a type checker to see
    model = pb.ModelProto()  # type: ignore[attr-defined]
    model.ParseFromString(proto.getvalue())
    piece = pb.ModelProto.SentencePiece  # type: ignore[attr-defined]
    vocab = []
    for p in model.pieces:
        if p.type == piece.BYTE:
            # Never chosen for literal text like "<0x41>"; byte fallback uses them regardless of score.
            vocab.append((p.piece, -1e4))
        elif p.type in (piece.NORMAL, piece.USER_DEFINED):
            # Pieces carry real spaces instead of U+2581, so text containing U+2581 still round-trips.
            vocab.append((p.piece.replace("\u2581", " "), p.score))
        else:
            vocab.append((p.piece, 0.0))
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(special_tokens)
    return tok
