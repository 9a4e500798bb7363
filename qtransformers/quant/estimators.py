"""Activation range estimators: small per-batch reductions on device, folded on the host.

Calibration computes `batch_stats(x, name, ...)` (jnp, jit-friendly; returns scalars or a small
loss vector, never the tensor) at every QuantPoint, brings those to the host and folds them with
the estimator's `update`; `finalize` gives the static range (x_min, x_max).

    est = get_estimator("running_minmax")
    state = est.init()
    for batch in batches:
        state = est.update(state, jax.device_get(est.batch_stats(x_of(batch))))
    x_min, x_max = est.finalize(state)

Estimators (paper.md §4, following the reference implementation):
- current_minmax: min / max of the last batch only.
- running_minmax: first batch initialises, then new = 0.1 * batch + 0.9 * old, separately for
  min and max.
- percentile: per batch the (100 - p)-th and p-th percentiles of the flattened tensor (linear
  interpolation, as np.percentile), then the same running average (the reference's OPT setting,
  p = 99.999).
- mse: sums the per-batch loss vectors over the candidate ranges `candidate_ranges(base)`
  (fractions i/N of a base range) and returns the candidate of least total loss. The base range
  (the candidate grid) is fixed by the FIRST batch: its own min-max range when `search_range`
  is None. Every later batch must be evaluated on that same grid: pass
  `search_range=est.search_range(state)`; `update` raises if the grid differs.
  The reference's activation MSE (its W6A6 / W4A4 setting, asymmetric quantizer) is a
  different algorithm: golden-section search (scipy minimize_scalar, bounded) over the range
  and then the shift, re-run on each batch with no accumulation, so the LAST calibration batch
  alone decides the range. Ours sums the loss over all batches on one fixed grid. Ranges and
  low-bit activation results can therefore differ from the reference's.

Host folding is done in float64 NumPy; `finalize` returns float32 NumPy arrays.
"""
import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.ops import quant as quant_ops

ESTIMATOR_NAMES = ("current_minmax", "running_minmax", "percentile", "mse")
DEFAULT_PERCENTILE = 99.999
DEFAULT_MOMENTUM = 0.9


def check_percentile(percentile: Any, name: str = "percentile") -> float:
    """Validates a high percentile p in (50, 100] (the low one is 100 - p)."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.number)) \
            or not 50 < float(percentile) <= 100:
        raise ValueError(f"{name} must be a number in (50, 100], got {percentile!r}")
    return float(percentile)


def _check_name(name: Any) -> str:
    if name not in ESTIMATOR_NAMES:
        raise ValueError(f"estimator name must be one of {ESTIMATOR_NAMES}, got {name!r}")
    return name


def batch_stats(
    x: jax.Array,
    estimator_name: str,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    bits: int = 8,
    symmetric: bool = False,
    num_candidates: int = 100,
    search_range: tuple[jax.Array, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Per-batch statistics one estimator needs, as small device arrays.

    Args:
      x: any shape; reduced over all elements (per-tensor range).
      estimator_name: one of ESTIMATOR_NAMES.
      percentile: static, high percentile p in (50, 100] ('percentile' only).
      bits, symmetric, num_candidates: static quantizer and grid settings ('mse' only).
      search_range: ('mse' only) base range (x_min, x_max) of the candidate grid; None = this
        batch's own min-max (use that for the first batch only).
    Returns:
      current_minmax / running_minmax: {'min': (), 'max': ()}.
      percentile: {'low': () the (100-p)-th percentile, 'high': () the p-th percentile}.
      mse: {'losses': (num_candidates,) mean squared errors, 'range_min': (), 'range_max': ()
        the base range the candidates were built from}.
    """
    name = _check_name(estimator_name)
    x = jax.lax.stop_gradient(jnp.asarray(x))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(-1)
    if name in ("current_minmax", "running_minmax"):
        return {"min": jnp.min(xf), "max": jnp.max(xf)}
    if name == "percentile":
        p = check_percentile(percentile)
        q = jnp.percentile(xf, jnp.asarray([100.0 - p, p], xf.dtype))
        return {"low": q[0], "high": q[1]}
    if search_range is None:
        lo, hi = jnp.min(xf), jnp.max(xf)
    else:
        lo = jnp.asarray(search_range[0], xf.dtype)
        hi = jnp.asarray(search_range[1], xf.dtype)
    cmin, cmax = quant_ops.candidate_ranges(lo, hi, num_candidates, symmetric)
    losses = quant_ops.mse_losses(xf, cmin, cmax, bits, symmetric)
    return {"losses": losses, "range_min": lo, "range_max": hi}


def _get(stats: Mapping[str, Any], key: str, name: str) -> np.ndarray:
    if key not in stats:
        raise ValueError(f"{name} stats must contain key {key!r}, got keys {sorted(stats)}")
    return np.asarray(stats[key], dtype=np.float64)


def _check_momentum(momentum: Any) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.number)) \
            or not 0 <= float(momentum) < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")


class MinMaxState(NamedTuple):
    """Host state of the min-max style estimators; x_min / x_max are None before any batch."""

    x_min: np.ndarray | None
    x_max: np.ndarray | None
    count: int


class MSEState(NamedTuple):
    """Host state of the MSE estimator: summed (N,) losses and the grid's base range."""

    losses: np.ndarray | None
    range_min: np.ndarray | None
    range_max: np.ndarray | None
    count: int


class RangeEstimator(Protocol):
    """init() -> state; update(state, stats) -> state; finalize(state) -> (x_min, x_max)."""

    name: ClassVar[str]

    def init(self) -> Any: ...

    def batch_stats(self, x: jax.Array, **kw: Any) -> dict[str, jax.Array]: ...

    def update(self, state: Any, stats: Mapping[str, Any]) -> Any: ...

    def finalize(self, state: Any) -> tuple[np.ndarray, np.ndarray]: ...


def _finalize_minmax(state: MinMaxState, name: str) -> tuple[np.ndarray, np.ndarray]:
    if state.count == 0:
        raise ValueError(f"{name}: finalize needs at least one update, got count=0")
    return state.x_min.astype(np.float32), state.x_max.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CurrentMinMax:
    """Min / max of the most recent batch."""

    name: ClassVar[str] = "current_minmax"
    stat_keys: ClassVar[tuple[str, str]] = ("min", "max")

    def init(self) -> MinMaxState:
        return MinMaxState(None, None, 0)

    def batch_stats(self, x: jax.Array) -> dict[str, jax.Array]:
        return batch_stats(x, self.name)

    def update(self, state: MinMaxState, stats: Mapping[str, Any]) -> MinMaxState:
        lo, hi = _get(stats, "min", self.name), _get(stats, "max", self.name)
        return MinMaxState(lo, hi, state.count + 1)

    def finalize(self, state: MinMaxState) -> tuple[np.ndarray, np.ndarray]:
        return _finalize_minmax(state, self.name)


def running_average(old: Any, new: Any, momentum: float) -> Any:
    """momentum · old + (1 − momentum) · new: the running range of RunningMinMax and
    Percentile, on the host (numpy) and in the calibration fold on device (jnp)."""
    return momentum * old + (1.0 - momentum) * new


class _RunningRange:
    """A range kept as the running average of two per-batch statistics (`stat_keys`); the
    first batch initialises it. Shared by RunningMinMax and Percentile."""

    name: ClassVar[str]
    stat_keys: ClassVar[tuple[str, str]]
    momentum: float

    def init(self) -> MinMaxState:
        return MinMaxState(None, None, 0)

    def update(self, state: MinMaxState, stats: Mapping[str, Any]) -> MinMaxState:
        lo, hi = (_get(stats, key, self.name) for key in self.stat_keys)
        if state.x_min is None:
            return MinMaxState(lo, hi, state.count + 1)
        return MinMaxState(running_average(state.x_min, lo, self.momentum),
                           running_average(state.x_max, hi, self.momentum), state.count + 1)

    def finalize(self, state: MinMaxState) -> tuple[np.ndarray, np.ndarray]:
        return _finalize_minmax(state, self.name)


@dataclasses.dataclass(frozen=True)
class RunningMinMax(_RunningRange):
    """Exponential moving average of per-batch min and max; the first batch initialises."""

    momentum: float = DEFAULT_MOMENTUM
    name: ClassVar[str] = "running_minmax"
    stat_keys: ClassVar[tuple[str, str]] = ("min", "max")

    def __post_init__(self) -> None:
        _check_momentum(self.momentum)

    def batch_stats(self, x: jax.Array) -> dict[str, jax.Array]:
        return batch_stats(x, self.name)


@dataclasses.dataclass(frozen=True)
class Percentile(_RunningRange):
    """Running average (as RunningMinMax) of the per-batch (100-p)-th / p-th percentiles."""

    percentile: float = DEFAULT_PERCENTILE
    momentum: float = DEFAULT_MOMENTUM
    name: ClassVar[str] = "percentile"
    stat_keys: ClassVar[tuple[str, str]] = ("low", "high")

    def __post_init__(self) -> None:
        check_percentile(self.percentile)
        _check_momentum(self.momentum)

    def batch_stats(self, x: jax.Array) -> dict[str, jax.Array]:
        return batch_stats(x, self.name, percentile=self.percentile)


@dataclasses.dataclass(frozen=True)
class MSE:
    """Grid search: argmin over candidates of the loss summed over batches (no momentum)."""

    bits: int = 8
    symmetric: bool = False
    num_candidates: int = 100
    name: ClassVar[str] = "mse"

    def __post_init__(self) -> None:
        quant_ops.int_grid(self.bits, self.symmetric)  # validates bits and symmetric
        quant_ops.candidate_ranges(0.0, 1.0, self.num_candidates, self.symmetric)

    def init(self) -> MSEState:
        return MSEState(None, None, None, 0)

    def search_range(self, state: MSEState) -> tuple[np.ndarray, np.ndarray] | None:
        """The base range to pass to batch_stats: None before the first batch."""
        if state.count == 0:
            return None
        return state.range_min.astype(np.float32), state.range_max.astype(np.float32)

    def batch_stats(
        self, x: jax.Array, search_range: tuple[Any, Any] | None = None
    ) -> dict[str, jax.Array]:
        return batch_stats(
            x,
            self.name,
            bits=self.bits,
            symmetric=self.symmetric,
            num_candidates=self.num_candidates,
            search_range=search_range,
        )

    def update(self, state: MSEState, stats: Mapping[str, Any]) -> MSEState:
        losses = _get(stats, "losses", self.name)
        lo, hi = _get(stats, "range_min", self.name), _get(stats, "range_max", self.name)
        if losses.shape != (self.num_candidates,):
            raise ValueError(
                f"mse losses must have shape ({self.num_candidates},), got {losses.shape}"
            )
        if state.count == 0:
            return MSEState(losses, lo, hi, 1)
        same = np.allclose([lo, hi], [state.range_min, state.range_max], rtol=1e-6, atol=0)
        if not same:
            raise ValueError(
                f"mse stats were computed on base range ({float(lo)}, {float(hi)}) but the grid "
                f"is fixed to ({float(state.range_min)}, {float(state.range_max)}) by the first "
                "batch; pass search_range=estimator.search_range(state) to batch_stats"
            )
        return MSEState(state.losses + losses, state.range_min, state.range_max, state.count + 1)

    def candidates(self, state: MSEState) -> tuple[np.ndarray, np.ndarray]:
        """The (N,) candidate ranges of the fixed grid, float32."""
        if state.count == 0:
            raise ValueError("mse: candidates need at least one update, got count=0")
        cmin, cmax = quant_ops.candidate_ranges(
            np.float32(state.range_min), np.float32(state.range_max),
            self.num_candidates, self.symmetric,
        )
        return np.asarray(cmin, np.float32), np.asarray(cmax, np.float32)

    def finalize(self, state: MSEState) -> tuple[np.ndarray, np.ndarray]:
        cmin, cmax = self.candidates(state)
        best = int(np.argmin(state.losses))
        return cmin[best], cmax[best]


_REGISTRY: dict[str, type] = {
    "current_minmax": CurrentMinMax,
    "running_minmax": RunningMinMax,
    "percentile": Percentile,
    "mse": MSE,
}


def get_estimator(name: str, **kwargs: Any) -> RangeEstimator:
    """Builds an estimator by name; kwargs go to its constructor (e.g. percentile=99.99)."""
    cls = _REGISTRY[_check_name(name)]
    allowed = tuple(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{name} estimator options must be among {allowed}, got {unknown}")
    return cls(**kwargs)
