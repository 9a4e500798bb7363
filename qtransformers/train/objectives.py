"""Training objectives: masked LM, causal LM and (soft-label) image classification.

Every objective returns sums over the batch (loss_sum, correct_sum, weight_sum), so gradient
accumulation and multi-batch evaluation normalise once by the total weight and equal one big
batch exactly.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

# Model family -> the data objective it trains on.
FAMILY_OBJECTIVES = {"bert": "mlm", "opt": "clm", "vit": "image"}


def model_inputs(family: str, batch: Mapping[str, jax.Array]) -> tuple[tuple, dict]:
    """Positional and keyword model inputs for a batch.

    bert: (input_ids, attention_mask, token_type_ids); opt: (input_ids, attention_mask);
    vit: (image,) with image (B, H, W, C).
    """
    if family == "bert":
        token_type_ids = batch.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(batch["input_ids"])
        kwargs = ({"predict_positions": batch["predict_positions"]}
                  if "predict_positions" in batch else {})
        return (batch["input_ids"], batch["attention_mask"], token_type_ids), kwargs
    if family == "opt":
        return (batch["input_ids"], batch["attention_mask"]), {}
    if family == "vit":
        return (batch["image"],), {}
    raise ValueError(f"model.family={family!r} has no objective; choose one of "
                     f"{tuple(FAMILY_OBJECTIVES)}.")


def select_predictions(batch: Mapping[str, jax.Array], max_predictions: int) -> dict[str, Any]:
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


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: jax.Array) -> dict[str, jax.Array]:
    """Weighted token cross entropy (MLM at masked positions, CLM at next-token targets).

    Args:
      logits: (B, T, V) float32.
      targets: (B, T) int token ids (for CLM already shifted: targets[t] = input_ids[t + 1]).
      weights: (B, T) float, > 0 where the loss counts.
    Returns:
      {'loss_sum', 'correct_sum', 'weight_sum'} scalars.
    """
    weights = weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                             targets.astype(jnp.int32))
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "correct_sum": jnp.sum(correct * weights),
            "weight_sum": jnp.sum(weights)}


def classification_cross_entropy(logits: jax.Array, labels: jax.Array,
                                 weights: jax.Array | None = None) -> dict[str, jax.Array]:
    """Cross entropy with integer or soft (mixup / cutmix) labels.

    Args:
      logits: (B, C) float32.
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


def compute_objective(family: str, logits: jax.Array,
                      batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The objective of `family` on its logits and batch (see the functions above)."""
    if family in ("bert", "opt"):
        return token_cross_entropy(logits, batch["targets"], batch["weights"])
    labels = batch["label_probs"] if "label_probs" in batch else batch["label"]
    return classification_cross_entropy(logits, labels, batch.get("weights"))


def finalize_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
    """Host-side: loss, accuracy and perplexity from summed statistics."""
    weight = max(float(sums["weight_sum"]), 1e-12)
    loss = float(sums["loss_sum"]) / weight
    return {"loss": loss, "accuracy": float(sums["correct_sum"]) / weight,
            "perplexity": math.exp(min(loss, 80.0))}


def apply_model(model: Any, params: Any, batch: Mapping[str, jax.Array], family: str, *,
                deterministic: bool, dropout_rng: jax.Array | None = None,
                mutable: Any = False) -> Any:
    """`model.apply` on a batch; dropout uses the 'dropout' rng when not deterministic."""
    args, kwargs = model_inputs(family, batch)
    rngs = None if deterministic or dropout_rng is None else {"dropout": dropout_rng}
    return model.apply({"params": params}, *args, deterministic=deterministic, rngs=rngs,
                       mutable=mutable, **kwargs)
