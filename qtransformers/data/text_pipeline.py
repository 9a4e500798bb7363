"""Text pipelines (CLM / MLM): rows from a source -> features -> resumable batch iterators.

Train iterators over local text (builtin, text) and over TFDS documents one per row
(packing='lines') are step-indexed (indexing.py): state {'step': k}, the per-process batches
together form the single-process global batch, and the state restores under any process count
with the same global batch size. TFDS text with packing='packed' is streamed: each process packs
the documents of its contiguous shard (documents n*p/P .. n*(p+1)/P - 1); state {'step', 'doc',
'offset'} restores under the same process layout only.

Evaluation reads the evaluation split (TFDS: its first eval_max_documents documents, 0 = all;
every process tokenizes the same documents so all get the same number of batches) in order,
once; the last batch is filled with padding rows of weight 0. MLM evaluation masks are fixed
(seed EVAL_SEED), so every evaluation of every run scores the same masked positions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from qtransformers.data.corpus import local_lines
from qtransformers.data.indexing import TAG_MLM, example_rng, process_rows, shard_range
from qtransformers.data.iterators import (Batch, DataIterator, IndexedBatches, stack,
                                          state_checker)
from qtransformers.data.objectives import clm_features, mlm_features
from qtransformers.data.sources import TFDSTexts
from qtransformers.data.text_rows import (LineRows, PackedRows, StreamedPacker, encode_stream,
                                          row_geometry)
from qtransformers.data.tokenizers import Tokenizer

EVAL_SEED = 0
Features = Callable[[np.ndarray, int, int], Batch]


def _features_fn(cfg: ml_collections.ConfigDict, tok: Tokenizer, seed: int) -> Features:
    """(tokens (W,), length, global position) -> feature dict of one row."""
    tok.require("pad_id", purpose="batching")
    if cfg.add_cls_first:
        tok.require("cls_id", purpose="data.add_cls_first=True")
    if cfg.objective == "clm":
        return lambda tokens, length, position: clm_features(tokens, length)
    tok.require("mask_id", purpose="objective='mlm'")
    specials = tok.special_ids

    def mlm(tokens: np.ndarray, length: int, position: int) -> Batch:
        return mlm_features(tokens, length, example_rng(seed, TAG_MLM, position),
                            special_ids=specials, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                            probability=cfg.mlm_probability)
    return mlm


def _rows(cfg: ml_collections.ConfigDict, tok: Tokenizer, texts: Sequence[str],
          keep_tail: bool) -> PackedRows | LineRows:
    width, _, _ = row_geometry(cfg.objective, cfg.seq_len, cfg.add_cls_first)
    if cfg.packing == "lines":
        return LineRows(texts, tok, width=width, add_cls_first=cfg.add_cls_first,
                        sep_at_line_breaks=cfg.sep_at_line_breaks)
    stream = encode_stream(tok, texts, cfg.sep_at_line_breaks)
    return PackedRows(stream, objective=cfg.objective, seq_len=cfg.seq_len,
                      add_cls_first=cfg.add_cls_first, cls_id=tok.cls_id, pad_id=tok.pad_id,
                      keep_tail=keep_tail)


def _indexed(rows: PackedRows | LineRows, features: Features, cfg: ml_collections.ConfigDict, *,
             global_batch_size: int, process_index: int, process_count: int, seed: int,
             finite: bool) -> DataIterator:
    def example(source: int, position: int) -> Batch:
        tokens, length = rows[source]
        return features(tokens, length, position)

    def pad() -> Batch:
        return features(np.full(rows.width, rows.pad_id, np.int32), 0, 0)

    batches = IndexedBatches(len(rows), example, global_batch_size=global_batch_size,
                             process_index=process_index, process_count=process_count, seed=seed,
                             shuffle=cfg.shuffle and not finite, finite=finite,
                             num_workers=cfg.num_workers, pad_fn=pad)
    fixed = {"kind": "indexed", "global_batch_size": global_batch_size, "seed": seed}
    return DataIterator(batches.stream, {**fixed, "step": 0}, prefetch=cfg.prefetch,
                        length=batches.num_batches, check_state=state_checker(fixed))


class _Shard(Sequence[str]):
    """Documents [start, end) of a random-access sequence."""

    def __init__(self, docs: Sequence[str], start: int, end: int) -> None:
        self.docs, self.start, self.end = docs, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.docs[self.start + int(i)]


def _streamed(docs: Sequence[str], tok: Tokenizer, features: Features,
              cfg: ml_collections.ConfigDict, *, global_batch_size: int, process_index: int,
              process_count: int, seed: int) -> DataIterator:
    rows = process_rows(global_batch_size, process_index, process_count)
    start, end = shard_range(len(docs), process_index, process_count)
    packer = StreamedPacker(_Shard(docs, start, end), tok, objective=cfg.objective,
                            seq_len=cfg.seq_len, add_cls_first=cfg.add_cls_first,
                            sep_at_line_breaks=cfg.sep_at_line_breaks, seed=seed,
                            shuffle=cfg.shuffle)
    length = packer.width  # every streamed row is full

    def stream(state: dict[str, Any]):
        step = int(state["step"])
        row_iter = packer.rows(int(state["doc"]), int(state["offset"]))
        while True:
            examples = []
            for r in rows:
                tokens, doc, offset = next(row_iter)
                examples.append(features(tokens, length, step * global_batch_size + r))
            step += 1
            yield stack(examples), {**state, "step": step, "doc": doc, "offset": offset}

    fixed = {"kind": "streamed", "global_batch_size": global_batch_size, "seed": seed,
             "process_index": process_index, "process_count": process_count}
    return DataIterator(stream, {**fixed, "step": 0, "doc": 0, "offset": 0},
                        prefetch=cfg.prefetch, check_state=state_checker(fixed))


def text_train_iterator(cfg: ml_collections.ConfigDict, tok: Tokenizer, *, global_batch_size: int,
                        process_index: int, process_count: int, seed: int) -> DataIterator:
    """Endless CLM / MLM training batches of this process (see the module docstring)."""
    features = _features_fn(cfg, tok, seed)
    layout = dict(global_batch_size=global_batch_size, process_index=process_index,
                  process_count=process_count, seed=seed)
    if cfg.source == "tfds":
        docs = TFDSTexts(cfg, cfg.tfds_split)
        if cfg.packing == "packed":
            return _streamed(docs, tok, features, cfg, **layout)
        return _indexed(_rows(cfg, tok, docs, keep_tail=False), features, cfg, finite=False,
                        **layout)
    rows = _rows(cfg, tok, local_lines(cfg, "train"), keep_tail=False)
    return _indexed(rows, features, cfg, finite=False, **layout)


def text_eval_iterator(cfg: ml_collections.ConfigDict, tok: Tokenizer, *, batch_size: int,
                       process_index: int, process_count: int) -> DataIterator:
    """One ordered pass over the evaluation text; len() = number of batches."""
    if cfg.source == "tfds":
        docs = TFDSTexts(cfg, cfg.eval_split)
        n = len(docs) if cfg.eval_max_documents <= 0 else min(len(docs), cfg.eval_max_documents)
        texts = [docs[i] for i in range(n)]
        if cfg.packing == "packed":  # one flat list of lines, documents in order
            texts = [ln for text in texts for ln in text.split("\n") if ln.strip()]
    else:
        texts = local_lines(cfg, "eval")
    rows = _rows(cfg, tok, texts, keep_tail=True)
    return _indexed(rows, _features_fn(cfg, tok, EVAL_SEED), cfg, global_batch_size=batch_size,
                    process_index=process_index, process_count=process_count, seed=EVAL_SEED,
                    finite=True)
