"""Training objectives: the model family's Task (qtransformers.models.tasks) on a batch.

Every objective returns sums over the batch (loss_sum, correct_sum, weight_sum), so gradient
accumulation and multi-batch evaluation normalise once by the total weight and equal one big
batch exactly. The losses themselves live with the Task; the names here stay for callers.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from qtransformers.models.tasks import (SUM_KEYS, classification_cross_entropy,  # noqa: F401 (re-exported)
                                        families, get_task, select_predictions,
                                        token_cross_entropy)


def family_objectives() -> dict[str, str]:
    """{model family: the data objective it trains on} of every registered Task."""
    return {name: get_task(name).data_objective for name in families()}


FAMILY_OBJECTIVES = family_objectives()


def model_inputs(family: str, batch: Mapping[str, jax.Array]) -> tuple[tuple, dict]:
    """Positional and keyword model inputs for a batch (Task.model_inputs of `family`)."""
    return get_task(family).model_inputs(batch)


def compute_objective(family: str, logits: jax.Array,
                      batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{'loss_sum', 'correct_sum', 'weight_sum'} of `family`'s task (Task.metric_sums)."""
    return get_task(family).metric_sums(logits, batch)


def finalize_metrics(sums: Mapping[str, Any], family: str) -> dict[str, float]:
    """Host-side: loss, accuracy (fraction) and perplexity (text) from summed statistics."""
    return get_task(family).finalize(sums)


def apply_model(model: Any, params: Any, batch: Mapping[str, jax.Array], family: str, *,
                deterministic: bool, dropout_rng: jax.Array | None = None,
                mutable: Any = False) -> Any:
    """`model.apply` on a batch; dropout uses the 'dropout' rng when not deterministic."""
    rngs = None if deterministic or dropout_rng is None else {"dropout": dropout_rng}
    return get_task(family).apply(model, {"params": params}, batch, deterministic=deterministic,
                                  rngs=rngs, mutable=mutable)
