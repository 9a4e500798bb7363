"""The losses of the Tasks (qtransformers.models.tasks): sums over the batch with keys
('loss_sum', 'correct_sum', 'weight_sum'), and BERT's masked-position selection."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: jax.Array) -> dict[str, jax.Array]:
    """Weighted token cross entropy (MLM at masked positions, CLM at next-token targets).

    Args:
      logits: (B, T, V).
      targets: (B, T) int token ids (for CLM already shifted: targets[t] = input_ids[t + 1]).
      weights: (B, T) float, > 0 where the loss counts.
    Returns:
      {'loss_sum', 'correct_sum', 'weight_sum'} float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32))
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


def classification_cross_entropy(logits: jax.Array, labels: jax.Array,
                                 weights: jax.Array | None = None) -> dict[str, jax.Array]:
    """Cross entropy with integer or soft (mixup / cutmix) labels.

    Args:
      logits: (B, C).
      labels: (B,) int class ids or (B, C) label probabilities.
      weights: optional (B,) example weights (0 for padding rows), default ones.
    Returns:
      {'loss_sum', 'correct_sum', 'weight_sum'}; accuracy counts argmax(labels) as the class.
    """
    num_classes = logits.shape[-1]
    probs = labels if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes)
    weights = jnp.ones(logits.shape[:1]) if weights is None else weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), probs.astype(jnp.float32))
    correct = (jnp.argmax(logits, -1) == jnp.argmax(probs, -1)).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


def select_predictions(batch: Mapping[str, Any], max_predictions: int) -> dict[str, Any]:
    """A masked-LM batch whose targets / weights cover at most `max_predictions` positions per
    row (the weighted ones first, in position order), plus their indices `predict_positions`
    (B, K) for the model's head. Weighted positions beyond K are dropped (K should exceed the
    masking rate x T by a few standard deviations: 32 for 15% of 128 drops ~0.1% of rows' tail).

    Args:
      batch: {'targets', 'weights': (B, T), ...}.
      max_predictions: K >= 1.
    """
    weights = batch["weights"]
    k = min(int(max_predictions), weights.shape[-1])
    # top_k on (weighted, -position): the weighted positions, in order, then padding.
    order = (weights > 0).astype(jnp.int32) * weights.shape[-1] - jnp.arange(weights.shape[-1])
    _, positions = jax.lax.top_k(order, k)
    out = dict(batch)
    out["predict_positions"] = positions
    out["targets"] = jnp.take_along_axis(batch["targets"], positions, axis=1)
    out["weights"] = jnp.take_along_axis(weights, positions, axis=1)
    return out
