"""The cheap block-output view of outliers: per-layer kurtosis and max |x| of each transformer
block's output, where the outliers sit (first token vs the rest) and the attention share of the
first token. Its names carry a `block_` prefix ('block_kurtosis', 'block_max_inf_norm'): the
paper's tracked-site metrics 'avg_kurtosis' / 'max_inf_norm' are qtransformers.evals.outliers'."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from qtransformers.ops.metrics import inf_norm_per_sample, kurtosis_per_sample
from qtransformers.models.tasks import get_task

# (model, family, params, batch) -> {metric name: (B,) per-sample values}
OutlierEvalFn = Callable[[nn.Module, str, Any, Mapping[str, jax.Array]], dict[str, jax.Array]]


def block_outputs(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """{'encoder/layers_0': (B, T, d), ...} from the sown 'block_output' intermediates."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
    out = {}
    for path, value in flat.items():
        if path[-1] == "block_output":
            out["/".join(path[:-1])] = value[-1] if isinstance(value, tuple) else value
    return out


def attention_probabilities(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """{'decoder/layers_0': (B, H, Tq, Tk), ...} from the sown 'attention_probs'."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
    return {"/".join(path[:-2]): value[-1] if isinstance(value, tuple) else value
            for path, value in flat.items() if path[-1] == "attention_probs"}


def default_outlier_eval_fn(model: nn.Module, family: str, params: Any,
                            batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-sample outlier statistics of every block output, and where the outliers sit.

    Text batches mask padded positions (attention_mask). Returns float32 (B,) arrays:
      block_kurtosis/<layer>, block_inf_norm/<layer>: over the whole (T, d) output;
      first_token_inf_norm/<layer>, rest_inf_norm/<layer>: max |x| at position 0 / elsewhere
        (no-op heads park on the first token, and that is where the outliers fire);
      first_token_attention/<layer>: attention probability on key 0, averaged over heads and
        valid queries.
    """
    _, state = get_task(family).apply(model, {"params": params}, batch,
                                      mutable=["intermediates"])
    where = batch["attention_mask"].astype(bool) if "attention_mask" in batch else None
    out = {}
    for layer, x in block_outputs(state["intermediates"]).items():
        out[f"block_kurtosis/{layer}"] = kurtosis_per_sample(x, where=where)
        out[f"block_inf_norm/{layer}"] = inf_norm_per_sample(x, where=where)
        if x.ndim == 3 and x.shape[1] > 1:
            out[f"first_token_inf_norm/{layer}"] = inf_norm_per_sample(x[:, :1])
            out[f"rest_inf_norm/{layer}"] = inf_norm_per_sample(
                x[:, 1:], where=None if where is None else where[:, 1:])
    for layer, probs in attention_probabilities(state["intermediates"]).items():
        share = probs[..., 0].astype(jnp.float32).mean(axis=1)  # (B, Tq)
        if where is None:
            out[f"first_token_attention/{layer}"] = share.mean(axis=-1)
        else:
            valid = where.astype(jnp.float32)
            out[f"first_token_attention/{layer}"] = ((share * valid).sum(-1)
                                                     / jnp.maximum(valid.sum(-1), 1.0))
    return out


def summarize_outliers(per_metric_means: Mapping[str, float]) -> dict[str, Any]:
    """Adds 'block_kurtosis' (mean over layers), 'block_max_inf_norm' (max over layers),
    'first_token_max_abs' / 'rest_max_abs' (max over layers) and 'first_token_attention' (mean
    over layers) to the dataset-averaged per-layer values."""
    def values(prefix: str) -> list[float]:
        return [v for k, v in per_metric_means.items() if k.startswith(prefix + "/")]

    out = dict(per_metric_means)
    for name, prefix, reduce in (
            ("block_kurtosis", "block_kurtosis", np.mean),
            ("block_max_inf_norm", "block_inf_norm", max),
            ("first_token_max_abs", "first_token_inf_norm", max),
            ("rest_max_abs", "rest_inf_norm", max),
            ("first_token_attention", "first_token_attention", np.mean)):
        if values(prefix):
            out[name] = float(reduce(values(prefix)))
    return out


@functools.lru_cache(maxsize=16)
def _block_step(fn: OutlierEvalFn, model: nn.Module, family: str, valid_rows: Callable,
                out_sharding: Any) -> Callable:
    # Per-sample values and the real-row mask come back on out_sharding (the trainer:
    # replicated, so every host can read them).
    return jax.jit(lambda params, batch: (fn(model, family, params, batch), valid_rows(batch)),
                   out_shardings=out_sharding)


def collect_block_outliers(model: nn.Module, family: str, params: Any,
                           batches: Iterable[Mapping[str, Any]], valid_rows: Callable,
                           fn: OutlierEvalFn | None = None,
                           out_sharding: Any = None) -> dict[str, Any]:
    """Dataset means (over real rows) of a block hook's per-sample metrics plus the summaries
    of summarize_outliers.

    Args:
      fn: (model, family, params, batch) -> {name: (B,)} (default: default_outlier_eval_fn).
      valid_rows: batch -> (B,) 1.0 for rows that count (padded eval batches).
      out_sharding: where the per-sample values land (None: jit's choice).
    """
    step = _block_step(fn or default_outlier_eval_fn, model, family, valid_rows, out_sharding)
    sums: dict[str, float] = {}
    count = 0.0
    for batch in batches:
        values, valid = jax.device_get(step(params, batch))
        valid = np.asarray(valid, np.float64)
        for name, per_sample in values.items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(per_sample * valid))
        count += float(valid.sum())
    return summarize_outliers({k: v / max(count, 1.0) for k, v in sums.items()})
