"""Token rows -> model features for causal LM (CLM) and BERT masked LM (MLM).

A row is `tokens` int32 (W,) with `length` valid leading tokens (the rest is [PAD]). CLM rows
have W = seq_len + 1 and MLM rows W = seq_len (see text_rows.py).

CLM: the shift happens HERE, not in the loss: input_ids = tokens[:-1], targets = tokens[1:], so
targets[t] is the token that follows input_ids[t] and the loss is plainly
sum(weights * CE(logits, targets)) / sum(weights) with no further shifting.

MLM (BERT / HF DataCollatorForLanguageModeling): each non-special, non-padding position is
selected with probability p (0.15); a selected position becomes [MASK] with prob. 0.8, a token
drawn uniformly from [0, vocab_size) with prob. 0.1 (HF draws from the whole vocabulary, specials
included, and so do we), and stays unchanged otherwise. targets = the original ids everywhere,
weights = 1.0 exactly at the selected positions.

Features (all numpy, per row; batches stack them to (B, T)):
  input_ids int32, attention_mask int32 (1 = real token), targets int32, weights float32,
  and for MLM token_type_ids int32 (zeros).
A padding row (length 0, used to fill the last evaluation batch) has weights 0 everywhere and
attention_mask 1 only at position 0, so no attention row is fully masked (no NaN softmax).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MASK_FRACTION = 0.8  # of the selected positions -> [MASK]
RANDOM_FRACTION = 0.5  # of the remaining selected positions -> random token (0.1 overall)


def mlm_mask(ids: np.ndarray, selectable: np.ndarray, rng: np.random.Generator, *,
             vocab_size: int, mask_id: int, probability: float = 0.15
             ) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of `ids` (int (..., T)) at positions where `selectable` (bool (..., T)).

    Returns:
      (input_ids int32 (..., T), weights float32 (..., T)): the corrupted ids and 1.0 at the
      selected positions. The original ids are the targets.
    """
    ids = np.asarray(ids, dtype=np.int32)
    selected = (rng.random(ids.shape) < probability) & selectable
    to_mask = selected & (rng.random(ids.shape) < MASK_FRACTION)
    to_random = selected & ~to_mask & (rng.random(ids.shape) < RANDOM_FRACTION)
    random_ids = rng.integers(0, vocab_size, size=ids.shape, dtype=np.int32)
    out = np.where(to_mask, np.int32(mask_id), ids)
    out = np.where(to_random, random_ids, out)
    return out.astype(np.int32), selected.astype(np.float32)


def special_mask(ids: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
    """bool array, same shape as `ids`: True where the id is a special token."""
    return np.isin(ids, np.asarray(special_ids, dtype=np.int32))


def _padding_attention(width: int, length: int) -> np.ndarray:
    mask = (np.arange(width) < length).astype(np.int32)
    mask[0] = 1  # padding rows attend to one position; their weights are 0
    return mask


def clm_features(tokens: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """Causal-LM features of one row: tokens int32 (T+1,), `length` valid tokens.

    Returns input_ids, attention_mask, targets int32 (T,), weights float32 (T,): weights are 1
    where input position t and its target t+1 are both real tokens.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    width = tokens.shape[0] - 1
    return {
        "input_ids": tokens[:-1].copy(),
        "attention_mask": _padding_attention(width, length),
        "targets": tokens[1:].copy(),
        "weights": (np.arange(width) < length - 1).astype(np.float32),
    }


def mlm_features(tokens: np.ndarray, length: int, rng: np.random.Generator, *,
                 special_ids: Sequence[int], vocab_size: int, mask_id: int,
                 probability: float) -> dict[str, np.ndarray]:
    """Masked-LM features of one row: tokens int32 (T,), `length` valid tokens.

    Returns input_ids (masked), attention_mask, token_type_ids, targets (original ids) int32
    (T,) and weights float32 (T,) (1.0 at the selected positions).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    width = tokens.shape[0]
    real = np.arange(width) < length
    inputs, weights = mlm_mask(tokens, real & ~special_mask(tokens, special_ids), rng,
                               vocab_size=vocab_size, mask_id=mask_id, probability=probability)
    return {
        "input_ids": inputs,
        "attention_mask": _padding_attention(width, length),
        "token_type_ids": np.zeros(width, np.int32),
        "targets": tokens.copy(),
        "weights": weights,
    }
