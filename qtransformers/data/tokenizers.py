"""Tokenizers behind one small interface: byte-level and word-level built in.

Every tokenizer has `encode(text) -> list[int]` (no special tokens added; the pipelines add
[CLS] / [SEP] themselves), `decode(ids) -> str` (special tokens skipped), `vocab_size` and the
special ids `pad_id`, `cls_id` (= BOS), `sep_id` (= EOS), `mask_id`, `unk_id`. A tokenizer loaded
from a file may lack some specials (None); pipelines that need one say so.

HuggingFace `tokenizers` .json files and SentencePiece .model files load through
`hf_tokenizers.py`.
"""
from __future__ import annotations

import abc
import collections
import hashlib
import json
import os
import re
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np

from qtransformers import fileio

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Word-level pre-tokenization: <unk>-style tags (WikiText), runs of word characters, or one
# punctuation character.
_WORD_RE = re.compile(r"<\w+>|\w+|[^\w\s]")


class Tokenizer(abc.ABC):
    """The interface every tokenizer offers. Subclasses set the ids and implement encode/decode."""

    kind: str = "base"
    vocab_size: int
    pad_id: int | None = None
    unk_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without added special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` (int array of shape (T,)), special tokens skipped."""

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        """`encode` over a list of lines (file tokenizers override this with a batched call)."""
        return [self.encode(line) for line in lines]

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids that are never MLM-selected: pad, unk, cls, sep and mask where defined."""
        ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
        return tuple(sorted({i for i in ids if i is not None}))

    def require(self, *names: str, purpose: str) -> None:
        """Raise ValueError when one of the special ids `names` (e.g. 'mask_id') is missing."""
        for name in names:
            if getattr(self, name) is None:
                raise ValueError(
                    f"tokenizer {self.kind!r} has no {name[:-3]} token, which {purpose} needs; "
                    f"train one with qtransformers.data.hf_tokenizers.train_tokenizer (it adds "
                    f"{' '.join(SPECIAL_TOKENS)}) or use tokenizer='byte' / 'word'.")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then [PAD]=256, [UNK]=257, [CLS]=258, [SEP]=259, [MASK]=260."""

    kind = "byte"

    def __init__(self) -> None:
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(256, 261)
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids 0..255."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """UTF-8 text of the byte ids (< 256) in `ids`; invalid sequences become U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def split_words(text: str) -> list[str]:
    """Word-level pre-tokenization: `<tag>`s, runs of word characters, single punctuation."""
    return _WORD_RE.findall(text)


class WordTokenizer(Tokenizer):
    """Words of a fixed list plus specials: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, words from 5.

    `vocab_size` is fixed by the config even when the corpus has fewer distinct words (the unused
    ids at the end are never produced), so a model can be sized before the vocabulary is built.
    Unknown words map to [UNK]; `decode` joins words with single spaces.
    """

    kind = "word"

    def __init__(self, words: Sequence[str], vocab_size: int) -> None:
        n_special = len(SPECIAL_TOKENS)
        if len(words) > vocab_size - n_special:
            raise ValueError(f"{len(words)} words do not fit vocab_size={vocab_size} with "
                             f"{n_special} special tokens; raise data.vocab_size.")
        self.words = list(words)
        self.vocab_size = vocab_size
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(n_special)
        self._itos = list(SPECIAL_TOKENS) + self.words
        self._stoi = {w: i for i, w in enumerate(self._itos)}

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int) -> WordTokenizer:
        """The top `vocab_size - 5` words of `texts` by count (ties broken alphabetically)."""
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(split_words(text))
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[: vocab_size - len(SPECIAL_TOKENS)]], vocab_size)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of `text` ([UNK]=1 for words outside the vocabulary)."""
        get, unk = self._stoi.get, self.unk_id
        return [get(w, unk) for w in split_words(text)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The words of the non-special ids in `ids`, joined by single spaces."""
        n = len(self._itos)
        return " ".join(self._itos[int(i)] for i in ids
                        if len(SPECIAL_TOKENS) <= int(i) < n)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (loaded back by `WordTokenizer.load`)."""
        data = {"format": "qtransformers-word-vocab", "vocab_size": self.vocab_size,
                "specials": list(SPECIAL_TOKENS), "words": self.words}
        fileio.makedirs(os.path.dirname(os.fspath(path)) or ".")
        # atomic: other processes never read a half-written file (local or gs://)
        fileio.write_text(path, json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a vocabulary written by `save`."""
        data = json.loads(fileio.read_text(path))
        if data.get("format") != "qtransformers-word-vocab":
            raise ValueError(f"{str(path)!r} is not a qtransformers word vocabulary file.")
        return cls(data["words"], int(data["vocab_size"]))

    def fingerprint(self) -> str:
        """A short hash of the vocabulary (to check that a run resumes with the same words)."""
        return hashlib.sha1("\n".join(self._itos).encode("utf-8")).hexdigest()[:12]
