"""Text -> fixed-width token rows: packed streams, one line (document) per row, streamed packing.

A row is (tokens int32 (W,), length): W = seq_len + 1 for CLM (inputs and the shifted targets
come from one row) and W = seq_len for MLM; `length` counts the valid leading tokens, the rest
is [PAD]. With add_cls_first every row starts with [CLS].

Packed ('packed'): lines are encoded, each followed by [SEP] when sep_at_line_breaks (else encoded
with its '\\n'), and concatenated into one stream. Row i holds [CLS]? + stream[i*S : i*S + R],
R = W - (1 if add_cls_first else 0) tokens read and stride S = seq_len for CLM (every stream
token is a target exactly once: with [CLS] the targets of row i are stream[i*T : (i+1)*T]) and
S = R for MLM (rows tile the stream). Training drops the incomplete tail; evaluation keeps it as a
last, padded row so that every token is scored.

Lines ('lines'): row i is [CLS]? + tokens of line (or TFDS document) i + [SEP], truncated to W
(keeping the final [SEP]) and padded.

Streamed (TFDS text, 'packed'): documents of this process' shard, in a fresh keyed order every
epoch, packed into rows as they come; the position is (document position, token offset).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from qtransformers.data.indexing import Permutation
from qtransformers.data.tokenizers import Tokenizer

_ENCODE_CHUNK = 4096


def encode_document(tok: Tokenizer, text: str, sep_at_line_breaks: bool) -> np.ndarray:
    """int32 ids of a (multi-line) text: its non-blank lines, each followed by [SEP] or '\\n'."""
    lines = [ln.strip() for ln in text.split("\n")]
    return encode_stream(tok, [ln for ln in lines if ln], sep_at_line_breaks)


def encode_stream(tok: Tokenizer, lines: Sequence[str], sep_at_line_breaks: bool) -> np.ndarray:
    """int32 (N,) ids of all `lines`, each followed by [SEP] (or encoded with a trailing '\\n')."""
    if sep_at_line_breaks:
        tok.require("sep_id", purpose="data.sep_at_line_breaks=True")
    parts: list[np.ndarray] = []
    sep = np.array([tok.sep_id], np.int32) if sep_at_line_breaks else None
    for start in range(0, len(lines), _ENCODE_CHUNK):
        chunk = lines[start:start + _ENCODE_CHUNK]
        if not sep_at_line_breaks:
            chunk = [line + "\n" for line in chunk]
        for ids in tok.encode_lines(chunk):
            parts.append(np.asarray(ids, np.int32))
            if sep is not None:
                parts.append(sep)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def row_geometry(objective: str, seq_len: int, add_cls_first: bool) -> tuple[int, int, int]:
    """(width W, tokens read per row R, stride S) of a packed row; see the module docstring."""
    width = seq_len + 1 if objective == "clm" else seq_len
    read = width - (1 if add_cls_first else 0)
    stride = seq_len if objective == "clm" else read
    return width, read, stride


class PackedRows:
    """Rows of a packed token stream: `rows[i]` -> (tokens int32 (W,), length)."""

    def __init__(self, stream: np.ndarray, *, objective: str, seq_len: int, add_cls_first: bool,
                 cls_id: int | None, pad_id: int, keep_tail: bool) -> None:
        self.stream = np.asarray(stream, np.int32)
        self.width, self.read, self.stride = row_geometry(objective, seq_len, add_cls_first)
        self.prefix = np.array([cls_id] if add_cls_first else [], np.int32)
        self.pad_id = pad_id
        extra = self.read - self.stride  # 1 for CLM without [CLS]: stream[0] is never a target
        usable = len(self.stream) - extra
        if keep_tail:
            self.n = max(0, -(-usable // self.stride))
        else:
            self.n = max(0, usable // self.stride) if len(self.stream) >= self.read else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"row {i} out of range [0, {self.n})")
        body = self.stream[i * self.stride: i * self.stride + self.read]
        row = np.full(self.width, self.pad_id, np.int32)
        row[: len(self.prefix)] = self.prefix
        row[len(self.prefix): len(self.prefix) + len(body)] = body
        return row, len(self.prefix) + len(body)


def line_row(ids: np.ndarray, *, width: int, prefix: np.ndarray, sep_id: int,
             pad_id: int) -> tuple[np.ndarray, int]:
    """[prefix] + ids + [SEP] truncated to `width` (the final [SEP] kept) and padded."""
    body = np.asarray(ids, np.int32)
    if len(body) == 0 or body[-1] != sep_id:
        body = np.append(body, np.int32(sep_id))
    room = width - len(prefix)
    if len(body) > room:
        body = np.append(body[: room - 1], np.int32(sep_id))
    row = np.full(width, pad_id, np.int32)
    row[: len(prefix)] = prefix
    row[len(prefix): len(prefix) + len(body)] = body
    return row, len(prefix) + len(body)


class LineRows:
    """One row per text (a local line or a TFDS document): `rows[i]` -> (tokens (W,), length).

    Texts are tokenized on access, so a huge TFDS split costs nothing up front.
    """

    def __init__(self, texts: Sequence[str], tok: Tokenizer, *, width: int, add_cls_first: bool,
                 sep_at_line_breaks: bool) -> None:
        tok.require("sep_id", "pad_id", purpose="data.packing='lines'")
        if add_cls_first:
            tok.require("cls_id", purpose="data.add_cls_first=True")
        self.texts, self.tok, self.width, self.pad_id = texts, tok, width, tok.pad_id
        self.prefix = np.array([tok.cls_id] if add_cls_first else [], np.int32)
        self.sep_at_line_breaks = sep_at_line_breaks

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        ids = encode_document(self.tok, self.texts[i], self.sep_at_line_breaks)
        return line_row(ids, width=self.width, prefix=self.prefix, sep_id=self.tok.sep_id,
                        pad_id=self.tok.pad_id)


class StreamedPacker:
    """Packs a (huge) sequence of documents into rows on the fly, resumable from (doc, offset).

    `doc` counts documents over epochs (epoch = doc // len(docs)); `offset` is the token offset
    into that document's ids.
    """

    def __init__(self, docs: Sequence[str], tok: Tokenizer, *, objective: str, seq_len: int,
                 add_cls_first: bool, sep_at_line_breaks: bool, seed: int, shuffle: bool) -> None:
        if len(docs) == 0:
            raise ValueError("this process' shard of the TFDS split has no documents; use fewer "
                             "processes or a bigger split.")
        self.docs, self.tok, self.seed, self.shuffle = docs, tok, seed, shuffle
        self.sep_at_line_breaks = sep_at_line_breaks
        self.width, self.read, self.stride = row_geometry(objective, seq_len, add_cls_first)
        self.prefix = np.array([tok.cls_id] if add_cls_first else [], np.int32)
        self._cache: dict[int, np.ndarray] = {}
        self._perms: dict[int, Permutation] = {}

    def _doc(self, pos: int) -> np.ndarray:
        if pos not in self._cache:
            n = len(self.docs)
            epoch, j = divmod(pos, n)
            if self.shuffle:
                if epoch not in self._perms:
                    self._perms = {epoch: Permutation(n, self.seed, epoch)}
                j = int(self._perms[epoch](np.array([j]))[0])
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[pos] = encode_document(self.tok, self.docs[j], self.sep_at_line_breaks)
        return self._cache[pos]

    def _take(self, pos: int, offset: int, count: int) -> tuple[np.ndarray, int, int]:
        """`count` tokens from (pos, offset) and the (pos, offset) right after them."""
        parts, need, empty_run = [], count, 0
        while need > 0:
            ids = self._doc(pos)
            take = min(len(ids) - offset, need)
            if take <= 0:
                empty_run += 1
                if empty_run > len(self.docs):
                    raise ValueError("every document of this shard encodes to zero tokens.")
                pos, offset = pos + 1, 0
                continue
            empty_run = 0
            parts.append(ids[offset: offset + take])
            need, offset = need - take, offset + take
            if offset == len(ids):
                pos, offset = pos + 1, 0
        return np.concatenate(parts), pos, offset

    def rows(self, pos: int, offset: int) -> Iterator[tuple[np.ndarray, int, int]]:
        """Endless rows from (pos, offset): (tokens int32 (W,), next pos, next offset)."""
        while True:
            body, _, _ = self._take(pos, offset, self.read)
            _, pos, offset = self._take(pos, offset, self.stride)
            yield np.concatenate([self.prefix, body]).astype(np.int32), pos, offset
