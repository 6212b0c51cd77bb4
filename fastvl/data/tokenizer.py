"""WordPiece tokenisation through the ``tokenizers`` library (BERT's uncased scheme).

For real data pass BERT's ``vocab.txt`` (bert-base-uncased, as ViLBERT uses); the synthetic set trains
its own small vocabulary with :func:`train_vocab`. Special tokens are looked up by name, so any
BERT-style vocabulary works.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from fastvl.data.format import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int


def load_tokenizer(vocab_file: str, lowercase: bool = True):
    """A BERT WordPiece tokenizer from a ``vocab.txt`` (one word piece per line)."""
    from tokenizers import BertWordPieceTokenizer  # optional 'train' extra

    if not os.path.isfile(vocab_file):
        raise DataError(f"{vocab_file}: vocabulary file not found (pass BERT's vocab.txt with --vocab, or make a "
                        "synthetic set with `fastvl data synth`, which writes its own)")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            pieces = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise DataError(f"{vocab_file}: vocabulary is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not pieces:
        raise DataError(f"{vocab_file}: vocabulary is empty (expected one word piece per line, as BERT's vocab.txt)")
    tokenizer = BertWordPieceTokenizer(vocab_file, lowercase=lowercase)
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise DataError(f"{vocab_file}: vocabulary lacks the special tokens {missing}")
    return tokenizer


def special_ids(tokenizer) -> SpecialIds:
    return SpecialIds(*(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS))


def train_vocab(texts: Iterable[str], out_file: str, vocab_size: int = 1000) -> str:
    """Trains a WordPiece vocabulary on ``texts`` with the ``tokenizers`` trainer and writes ``out_file``
    as a BERT ``vocab.txt``: the special tokens first, then the learnt pieces sorted. The trainer breaks
    frequency ties differently between runs; use :func:`closed_vocab` where the file must be the same."""
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    pieces = sorted(set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS))
    with open(out_file, "w", encoding="utf-8") as f:
        f.write("\n".join([*SPECIAL_TOKENS, *pieces]) + "\n")
    return out_file


def closed_vocab(words: Iterable[str], out_file: str) -> str:
    """A WordPiece ``vocab.txt`` for a closed set of words: the special tokens, every character (alone
    and as a ``##`` continuation) and every whole word, sorted, so the same words always give the same
    file (the WordPiece trainer breaks frequency ties differently between runs)."""
    words = {w.lower() for text in words for w in text.split()}
    chars = {c for w in words for c in w}
    pieces = sorted(chars) + sorted(f"##{c}" for c in chars) + sorted(words - chars)
    with open(out_file, "w", encoding="utf-8") as f:
        f.write("\n".join([*SPECIAL_TOKENS, *pieces]) + "\n")
    return out_file
