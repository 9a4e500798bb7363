"""Periodic outlier evaluation: per-layer kurtosis and max |x| of the transformer block outputs
(paper.md §5), recorded over training (the kurtosis-over-training curve)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import flax.linen as nn

from qtransformers.train.objectives import apply_model

# (model, family, params, batch) -> {metric name: (B,) per-sample values}
OutlierEvalFn = Callable[[nn.Module, str, Any, Mapping[str, jax.Array]], dict[str, jax.Array]]


def _metric_fns() -> tuple[Callable, Callable]:
    """kurtosis_per_sample / inf_norm_per_sample from ops.metrics (local fallbacks otherwise)."""
    try:
        from qtransformers.ops.metrics import inf_norm_per_sample, kurtosis_per_sample
        return kurtosis_per_sample, inf_norm_per_sample
    except ImportError:  # the metrics module is optional for training
        def kurtosis(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
            x = x.reshape(x.shape[0], -1).astype(jnp.float32)
            c = x - x.mean(-1, keepdims=True)
            return (c ** 4).mean(-1) / ((c ** 2).sum(-1) / (x.shape[1] - 1)) ** 2

        def inf_norm(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
            return jnp.abs(x.reshape(x.shape[0], -1)).max(-1).astype(jnp.float32)
        return kurtosis, inf_norm


def block_outputs(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """{'encoder/layers_0': (B, T, d), ...} from the sown 'block_output' intermediates."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
    out = {}
    for path, value in flat.items():
        if path[-1] == "block_output":
            out["/".join(path[:-1])] = value[-1] if isinstance(value, tuple) else value
    return out


def default_outlier_eval_fn(model: nn.Module, family: str, params: Any,
                            batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-sample kurtosis and inf-norm of every block output.

    Text batches mask padded positions (attention_mask). Returns
    {'kurtosis/<layer>': (B,), 'inf_norm/<layer>': (B,)} float32.
    """
    kurtosis_fn, inf_norm_fn = _metric_fns()
    _, state = apply_model(model, params, batch, family, deterministic=True,
                           mutable=["intermediates"])
    where = batch["attention_mask"].astype(bool) if "attention_mask" in batch else None
    out = {}
    for layer, x in block_outputs(state["intermediates"]).items():
        out[f"kurtosis/{layer}"] = kurtosis_fn(x, where=where)
        out[f"inf_norm/{layer}"] = inf_norm_fn(x, where=where)
    return out


def summarize_outliers(per_metric_means: Mapping[str, float]) -> dict[str, Any]:
    """Adds 'avg_kurtosis' (mean over layers) and 'max_inf_norm' (max over layers) to the
    dataset-averaged per-layer values."""
    kurt = [v for k, v in per_metric_means.items() if k.startswith("kurtosis/")]
    inf = [v for k, v in per_metric_means.items() if k.startswith("inf_norm/")]
    out = dict(per_metric_means)
    if kurt:
        out["avg_kurtosis"] = sum(kurt) / len(kurt)
    if inf:
        out["max_inf_norm"] = max(inf)
    return out
