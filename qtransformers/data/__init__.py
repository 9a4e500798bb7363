"""Data layer: built-in corpus, local text, TFDS sources, tokenizers, MLM / CLM / image pipelines.

The trainer calls:
  it = make_train_iterator(cfg, global_batch_size=B, process_index=p, process_count=P, seed=s)
  batch = next(it)               # dict of numpy arrays, B // P rows of this process
  state = it.get_state()         # small JSON dict; save it with the checkpoint
  it.set_state(state)            # on a fresh iterator: continues with exactly the same batches
  for batch in make_eval_iterator(cfg, batch_size=B, process_index=p, process_count=P): ...

Batch keys — 'clm': input_ids, attention_mask, targets (= next tokens, already shifted), weights;
'mlm': input_ids (masked), attention_mask, token_type_ids, targets (original ids), weights (1 at
the selected positions); 'image': image, label, label_probs, weights. Ids / masks / labels are
int32, images / weights / label_probs float32. Loss = sum(weights * CE(logits, targets)) /
sum(weights) in every text case.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections

from qtransformers.data.config import default_data_config, validate_data_config
from qtransformers.data.hf_tokenizers import tokenizer_main, train_tokenizer
from qtransformers.data.image_pipeline import image_eval_iterator, image_train_iterator
from qtransformers.data.image_pipeline import num_classes as _num_classes
from qtransformers.data.iterators import DataIterator
from qtransformers.data.objectives import mlm_mask
from qtransformers.data.text_pipeline import text_eval_iterator, text_train_iterator
from qtransformers.data.tokenizers import ByteTokenizer, Tokenizer, WordTokenizer
from qtransformers.data.vocab import build_tokenizer, vocab_size


def num_classes(cfg: ml_collections.ConfigDict) -> int:
    """Number of classes of an image config (for the ViT head)."""
    validate_data_config(cfg)
    if cfg.objective != "image":
        raise ValueError(f"data.objective={cfg.objective!r} has no classes; use 'image'.")
    return _num_classes(cfg)


def make_train_iterator(cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1, seed: int | None = None,
                        workdir: str | Path | None = None,
                        tokenizer: Tokenizer | None = None) -> DataIterator:
    """Endless training batches of this process: global_batch_size // process_count rows each.

    Args:
      cfg: the data config (default_data_config()).
      global_batch_size: rows of the global batch (a multiple of process_count).
      process_index, process_count: this process and how many read in parallel (jax.process_*);
        each reads a disjoint set of rows.
      seed: data seed (order, masking, augmentation); None = cfg.seed.
      workdir: where the 'word' vocabulary is cached (optional).
      tokenizer: a prebuilt tokenizer (default: build_tokenizer(cfg, workdir)).
    Returns:
      A DataIterator (next(), get_state(), set_state()).
    """
    validate_data_config(cfg)
    seed = int(cfg.seed if seed is None else seed)
    layout = dict(global_batch_size=global_batch_size, process_index=process_index,
                  process_count=process_count, seed=seed)
    if cfg.objective == "image":
        return image_train_iterator(cfg, **layout)
    tok = tokenizer or build_tokenizer(cfg, workdir)
    return text_train_iterator(cfg, tok, **layout)


def make_eval_iterator(cfg: ml_collections.ConfigDict, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1, workdir: str | Path | None = None,
                       tokenizer: Tokenizer | None = None) -> DataIterator:
    """One deterministic, ordered pass over the evaluation split.

    `batch_size` is the GLOBAL evaluation batch (as for training): each process yields
    batch_size // process_count rows, every process yields the same number of batches
    (len(iterator)), and rows past the end of the split are padding with weights 0.
    """
    validate_data_config(cfg)
    layout = dict(batch_size=batch_size, process_index=process_index, process_count=process_count)
    if cfg.objective == "image":
        return image_eval_iterator(cfg, **layout)
    tok = tokenizer or build_tokenizer(cfg, workdir)
    return text_eval_iterator(cfg, tok, **layout)


__all__ = [
    "ByteTokenizer", "DataIterator", "Tokenizer", "WordTokenizer", "build_tokenizer",
    "default_data_config", "make_eval_iterator", "make_train_iterator", "mlm_mask",
    "num_classes", "tokenizer_main", "train_tokenizer", "validate_data_config", "vocab_size",
]
