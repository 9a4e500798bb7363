"""Retrofit data: training batches from the Wikipedia summaries' training split, and the
retrieval task on a fixed subset of the held-out split (never trained on).

Training texts: the queries and documents (first sentence / the rest) of every multi-sentence
summary of the training split (data.wikipedia: sha1(title) above eval_fraction), tokenized
and truncated to seq_len. Batch of step s: rows s·B .. s·B + B − 1 of an order that is a fresh
permutation (numpy, seeded by (seed, epoch)) every pass over the texts, so a resumed run sees
the same batches as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from qtransformers.convert.sentence_transformers import pad_ids
from qtransformers.evaluate.embedding import EmbeddingTask


def encoder_tokenizer(folder: str, max_length: int) -> Any:
    """The EncoderTokenizer of a model folder (tokenizer.json or vocab.txt), truncating to
    max_length tokens; UserError (one line) when the folder has none."""
    from qtransformers.commandline import UserError
    from qtransformers.convert import EncoderTokenizer, describe_encoder_folder
    try:
        return EncoderTokenizer.from_folder(describe_encoder_folder(folder), max_length)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"tokenizer folder {folder}: {str(err).splitlines()[0]}; set "
                        "data.tokenizer to a folder with tokenizer.json or vocab.txt.") from None


def training_texts(eval_fraction: float) -> list[str]:
    """Queries and documents of the training split's inverse-cloze pairs, in title order."""
    from qtransformers.data import wikipedia
    pairs = wikipedia.inverse_cloze_pairs(wikipedia.split_articles("train", eval_fraction))
    return [t for _, q, d in pairs for t in (q, d)]


def held_out_task(tokenizer: Any, eval_fraction: float, num_articles: int,
                  batch_size: int = 64) -> EmbeddingTask:
    """The retrieval task on the `num_articles` held-out articles with the smallest
    sha1(title) (all of the split when it has fewer); calibration texts: the training split."""
    from qtransformers.data import wikipedia
    pairs = wikipedia.inverse_cloze_pairs(wikipedia.split_articles("eval", eval_fraction))
    pairs = sorted(pairs, key=lambda p: hashlib.sha1(p[0].encode()).hexdigest())[:num_articles]
    if len(pairs) < 2:
        raise ValueError(f"the held-out split has {len(pairs)} multi-sentence articles; raise "
                         "data.eval_fraction.")
    pairs = sorted(pairs)
    return EmbeddingTask([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs],
                         training_texts(eval_fraction), tokenizer, batch_size)


class TrainBatches:
    """batch(step) -> {'input_ids', 'attention_mask', 'token_type_ids'} (B, seq_len) int32."""

    def __init__(self, ids: list[np.ndarray], batch_size: int, seq_len: int, pad_id: int,
                 seed: int):
        if len(ids) < batch_size:
            raise ValueError(f"{len(ids)} training texts are fewer than one batch of "
                             f"{batch_size}.")
        self.ids, self.batch_size, self.seq_len = ids, batch_size, seq_len
        self.pad_id, self.seed = pad_id, seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(
                len(self.ids))}
        return self._orders[epoch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        per_epoch = len(self.ids) // self.batch_size
        epoch, i = divmod(step, per_epoch)
        rows = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return pad_ids([self.ids[r][:self.seq_len] for r in rows], self.pad_id, self.seq_len)
