"""Outlier metrics (paper.md §5), computed in float32 (bf16 / f16 inputs are upcast).

- kurtosis_per_sample: NON-excess kurtosis (a Gaussian gives ~3) of each sample's flattened
  tensor: E[(x - mu)^4] / (std_unbiased^4 + 1e-6), as the reference.
- excess_kurtosis_per_sample: exactly kurtosis_per_sample - 3 (same eps, same unbiased std), so a
  Gaussian gives ~0. Only for comparison with papers that report excess kurtosis.
- inf_norm_per_sample: max |x| per sample.
- aggregate_outlier_metrics: dataset-averaged per-tensor values -> max inf-norm over tensors and
  mean kurtosis over tensors.

`where` masks (e.g. (B, T) with True for real tokens) exclude padded positions: their shape must
equal the leading dims of x; they broadcast over the remaining (feature) dims.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp

KURTOSIS_EPS = 1e-6


def _prepare(x: jax.Array, where: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Upcasts x and returns (x, mask), both of x's shape; mask is float 0/1."""
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if where is None:
        return x, jnp.ones_like(x)
    where = jnp.asarray(where)
    if where.ndim > x.ndim or x.shape[: where.ndim] != where.shape:
        raise ValueError(
            f"where must have the leading dims of x {x.shape}, got shape {where.shape}"
        )
    mask = where.reshape(where.shape + (1,) * (x.ndim - where.ndim)).astype(x.dtype)
    return x, jnp.broadcast_to(mask, x.shape)


def _check_batched(x: jax.Array) -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must have shape (B, ...) with ndim >= 2, got shape {jnp.shape(x)}")


def kurtosis_per_sample(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Non-excess kurtosis of each sample, over its flattened (masked) elements.

    kurt = mean((x - mu)^4) / (var_unbiased^2 + 1e-6), where mu, the 4th central moment and the
    unbiased variance (divisor n - 1) use only the elements where the mask is True.

    Args:
      x: (B, ...), e.g. (B, T, d); any float dtype.
      where: optional bool mask of x's leading dims, e.g. (B, T).
    Returns:
      (B,) float32.
    """
    _check_batched(x)
    x, m = _prepare(x, where)
    axes = tuple(range(1, x.ndim))
    n = jnp.sum(m, axis=axes, keepdims=True)
    mu = jnp.sum(m * x, axis=axes, keepdims=True) / jnp.maximum(n, 1)
    c = m * (x - mu)
    n = n.reshape(-1)
    m4 = jnp.sum(c**4, axis=axes) / jnp.maximum(n, 1)
    var = jnp.sum(c**2, axis=axes) / jnp.maximum(n - 1, 1)
    return m4 / (var**2 + KURTOSIS_EPS)


def excess_kurtosis_per_sample(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """kurtosis_per_sample(x, where) - 3 (a Gaussian gives ~0). x: (B, ...) -> (B,)."""
    return kurtosis_per_sample(x, where) - 3.0


def inf_norm_per_sample(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """max |x| of each sample over its (masked) elements. x: (B, ...) -> (B,) float32."""
    _check_batched(x)
    x, m = _prepare(x, where)
    return jnp.max(jnp.abs(x) * m, axis=tuple(range(1, x.ndim)))


def per_channel_max_abs(x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """max |x| per channel (last axis) over all other (masked) positions. (..., d) -> (d,)."""
    x, m = _prepare(x, where)
    return jnp.max(jnp.abs(x) * m, axis=tuple(range(x.ndim - 1)))


def aggregate_outlier_metrics(per_tensor_means: Mapping[str, Mapping[str, Any]]) -> dict:
    """Aggregates dataset-averaged per-tensor metrics (paper.md §5), on the host.

    Args:
      per_tensor_means: {tensor_name: {'inf_norm': float, 'kurtosis': float}}, each value the
        mean over validation samples; a tensor may carry only one of the two keys (e.g. a
        residual sum tracked for inf-norm only).
    Returns:
      {'max_inf_norm': max over tensors of inf_norm, 'max_inf_norm_tensor': its name,
       'avg_kurtosis': mean over tensors of kurtosis (non-excess), 'inf_norm': {name: value},
       'kurtosis': {name: value}}; an aggregate is nan when no tensor carries its key.
    """
    inf = {k: float(v["inf_norm"]) for k, v in per_tensor_means.items() if "inf_norm" in v}
    kurt = {k: float(v["kurtosis"]) for k, v in per_tensor_means.items() if "kurtosis" in v}
    worst = max(inf, key=inf.__getitem__) if inf else None
    return {
        "max_inf_norm": inf[worst] if inf else float("nan"),
        "max_inf_norm_tensor": worst,
        "avg_kurtosis": sum(kurt.values()) / len(kurt) if kurt else float("nan"),
        "inf_norm": inf,
        "kurtosis": kurt,
    }
