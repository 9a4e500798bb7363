"""Device side of the activation range estimators, used by QuantPoints during calibration.

`EstimatorObserver` computes the same per-batch statistics as `estimators.batch_stats` (with an
optional mask of real tokens) and folds them into the running estimate exactly as the host
estimator's update + finalize would, so sequential calibration can quantize with the updated
range inside the forward pass (see quant.calibrate).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.nn.quant_point import masked_min_max
from qtransformers.ops import quant as quant_ops
from qtransformers.quant import estimators
from qtransformers.quant.config import QuantConfig


@dataclasses.dataclass(frozen=True)
class EstimatorObserver:
    """Device side of a range estimator (quant.estimators): statistics and the running fold.

    `stats` equals estimators.batch_stats when no mask is given; with a mask only the real
    positions count (percentiles via `tail_percentiles`; MSE losses averaged over real entries,
    padded entries are set to 0, which every candidate represents exactly).
    """

    name: str = "running_minmax"
    bits: int = 8
    percentile: float = estimators.DEFAULT_PERCENTILE
    momentum: float = estimators.DEFAULT_MOMENTUM
    num_candidates: int = 100

    @classmethod
    def from_config(cls, config: QuantConfig) -> "EstimatorObserver":
        """The observer of config.act_estimator with its options."""
        return cls(config.act_estimator, config.act_bits, float(config.act_percentile),
                   float(config.act_momentum), config.num_candidates)

    def estimator(self) -> estimators.RangeEstimator:
        """The host-side estimator with the same options."""
        if self.name == "mse":
            return estimators.get_estimator("mse", bits=self.bits, symmetric=False,
                                            num_candidates=self.num_candidates)
        if self.name == "percentile":
            return estimators.get_estimator("percentile", percentile=self.percentile,
                                            momentum=self.momentum)
        if self.name == "running_minmax":
            return estimators.get_estimator("running_minmax", momentum=self.momentum)
        return estimators.get_estimator(self.name)

    def state_arrays(self, state: Any) -> dict[str, np.ndarray]:
        """Host estimator state -> fixed-structure float32 / int32 arrays for `qstate`."""
        if self.name == "mse":
            n = self.num_candidates
            losses = np.zeros(n) if state.losses is None else state.losses
            lo = 0.0 if state.range_min is None else state.range_min
            hi = 0.0 if state.range_max is None else state.range_max
            return {"losses": np.asarray(losses, np.float32), "range_min": np.float32(lo),
                    "range_max": np.float32(hi), "count": np.int32(state.count)}
        lo = 0.0 if state.x_min is None else state.x_min
        hi = 0.0 if state.x_max is None else state.x_max
        return {"x_min": np.float32(lo), "x_max": np.float32(hi), "count": np.int32(state.count)}

    def stats(self, x: jax.Array, where: jax.Array | None,
              state: Mapping[str, jax.Array] | None) -> dict[str, jax.Array]:
        """Per-batch statistics (keys as estimators.batch_stats). x any shape."""
        x = jax.lax.stop_gradient(x)
        if self.name in ("current_minmax", "running_minmax"):
            return masked_min_max(x, where)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.name == "percentile":
            return tail_percentiles(xf, where, self.percentile)
        own = masked_min_max(xf, where)
        lo, hi = own["min"], own["max"]
        if state is not None:  # later batches: the grid fixed by the first batch
            first = state["count"] == 0
            lo = jnp.where(first, lo, state["range_min"])
            hi = jnp.where(first, hi, state["range_max"])
        cmin, cmax = quant_ops.candidate_ranges(lo, hi, self.num_candidates, False)
        if where is None:
            losses = quant_ops.mse_losses(xf, cmin, cmax, self.bits, False)
        else:
            valid = jnp.maximum(jnp.sum(where), 1)
            losses = quant_ops.mse_losses(jnp.where(where, xf, 0), cmin, cmax, self.bits,
                                          False) * (where.size / valid)
        return {"losses": losses, "range_min": lo, "range_max": hi}

    def fold(self, state: Mapping[str, jax.Array] | None,
             stats: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """The range after this batch, as the host estimator's update + finalize would give."""
        seen = jnp.asarray(False) if state is None else state["count"] > 0
        if self.name == "mse":
            prior = 0.0 if state is None else jnp.where(seen, state["losses"], 0.0)
            total = prior + stats["losses"]
            cmin, cmax = quant_ops.candidate_ranges(stats["range_min"], stats["range_max"],
                                                    self.num_candidates, False)
            best = jnp.argmin(total)
            return cmin[best], cmax[best]
        lo, hi = (stats[key] for key in self.estimator().stat_keys)
        if self.name == "current_minmax" or state is None:
            return lo, hi
        return (jnp.where(seen, estimators.running_average(state["x_min"], lo, self.momentum), lo),
                jnp.where(seen, estimators.running_average(state["x_max"], hi, self.momentum), hi))


def _high_percentile(values: jax.Array, n: jax.Array, p: float, k: int) -> jax.Array:
    # values: (N,) with excluded entries at -inf; the p-th percentile (linear interpolation, as
    # np.percentile) of the n real ones lies among the k largest. With d = (1 - p/100)(n - 1)
    # the position counted from the top, it is top[ceil d] + (top[floor d] - top[ceil d]) *
    # (ceil d - d); d is small, so float32 keeps it exact where p/100 * (n - 1) would not.
    top = jax.lax.top_k(values, k)[0]  # descending
    d = (1.0 - p / 100.0) * (n - 1).astype(values.dtype)
    up, down = jnp.ceil(d), jnp.floor(d)
    a, b = top[up.astype(jnp.int32)], top[down.astype(jnp.int32)]
    return a + (b - a) * (up - d)


def tail_percentiles(xf: jax.Array, where: jax.Array | None, p: float) -> dict[str, jax.Array]:
    """{'low': (100-p)-th, 'high': p-th percentile} of xf's real entries (where; all if None).

    Equal to np.percentile (linear interpolation). For p close to 100 only the ~N(1 - p/100)
    extreme values are needed: two top_k calls instead of sorting the whole tensor (a CPU sort
    of the attention scores dominated calibration time otherwise).
    """
    flat = xf.reshape(-1)
    size = flat.shape[0]
    k = min(size, int(math.floor((size - 1) * (1.0 - p / 100.0))) + 2)
    if k > max(size // 8, 1):
        if where is None:
            return estimators.batch_stats(xf, "percentile", percentile=p)
        q = jnp.nanpercentile(jnp.where(where, xf, jnp.nan), jnp.asarray([100.0 - p, p]))
        return {"low": q[0], "high": q[1]}
    if where is None:
        n, hi_vals, lo_vals = jnp.asarray(size), flat, -flat
    else:
        valid = where.reshape(-1)
        n = jnp.sum(valid).astype(jnp.int32)
        hi_vals = jnp.where(valid, flat, -jnp.inf)
        lo_vals = jnp.where(valid, -flat, -jnp.inf)
    # The (100-p)-th percentile of x is minus the p-th percentile of -x.
    return {"low": -_high_percentile(lo_vals, n, p, k), "high": _high_percentile(hi_vals, n, p, k)}
