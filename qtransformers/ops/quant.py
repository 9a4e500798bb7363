"""Uniform fake quantization (paper Eq. 1) and MSE range search, as pure jnp functions.

    q(x; s, z, b) = s * (clip(round(x / s) + z, qmin, qmax) - z)

- Asymmetric: grid [0, 2^b - 1]; the range is first widened to include 0
  (x_min <- min(x_min, 0), x_max <- max(x_max, 0)); s = (x_max - x_min) / (2^b - 1),
  z = round(-x_min / s).
- Symmetric (signed): grid [-2^(b-1), 2^(b-1) - 1], z = 0,
  s = max(|x_min|, |x_max|) / (2^(b-1) - 1)   (weights at 8 bits: max|w| / 127).
- Rounding is round-half-to-even (`jnp.round`).
- A zero-width range (s == 0, e.g. an all-zero tensor) maps every value to 0, the s -> 0 limit
  of Eq. 1; no NaN is produced.

Gradient: clipped straight-through estimator. d out / d x = 1 where the rounded integer
round(x / s) + z lies inside [qmin, qmax] (the value is representable, no clipping happened) and
0 where it was clipped (and everywhere when s == 0). As in the reference (round_ste followed by a
clamp). The ranges x_min / x_max receive no gradient (they are calibrated, not learned).
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any

MIN_BITS = 2
MAX_BITS = 16


def check_bits(bits: Any, name: str = "bits") -> int:
    """Validates a static bit width: a Python int in 2..16. Returns it as int."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise ValueError(
            f"{name} must be a static Python int in {MIN_BITS}..{MAX_BITS}, got {bits!r}"
        )
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return int(bits)


def _check_symmetric(symmetric: Any) -> bool:
    if not isinstance(symmetric, (bool, np.bool_)):
        raise ValueError(f"symmetric must be a static bool (True or False), got {symmetric!r}")
    return bool(symmetric)


def _compute_dtype(dtype: Any) -> Any:
    # bf16 / f16 inputs are quantized in float32: x / s in bf16 would misplace grid points.
    return jnp.promote_types(dtype, jnp.float32)


def int_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid (qmin, qmax): symmetric [-2^(b-1), 2^(b-1)-1], asymmetric [0, 2^b-1]."""
    bits = check_bits(bits)
    if _check_symmetric(symmetric):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_and_zero_point(
    x_min: ArrayLike, x_max: ArrayLike, bits: int, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
    """Scale s and zero point z (a float holding an integer) of Eq. 1.

    Args:
      x_min, x_max: range, scalars or arrays of one broadcastable shape S.
      bits: static int in 2..16.
      symmetric: static bool.
    Returns:
      (s, z), each of the broadcast shape S; s >= 0 (0 for a zero-width range).
    """
    qmin, qmax = int_grid(bits, symmetric)
    lo = jnp.asarray(x_min)
    hi = jnp.asarray(x_max)
    dtype = _compute_dtype(jnp.result_type(lo, hi))
    lo, hi = lo.astype(dtype), hi.astype(dtype)
    if symmetric:
        s = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / qmax
        return s, jnp.zeros_like(s)
    lo = jnp.minimum(lo, 0)
    hi = jnp.maximum(hi, 0)
    s = (hi - lo) / (qmax - qmin)
    z = jnp.round(-lo / jnp.where(s > 0, s, 1))
    return s, z


def fake_quant(
    x: jax.Array, x_min: ArrayLike, x_max: ArrayLike, bits: int, symmetric: bool
) -> jax.Array:
    """Quantize-dequantize x with the range [x_min, x_max] (paper Eq. 1), clipped STE gradient.

    Args:
      x: any shape (...), any float dtype.
      x_min, x_max: scalars (per tensor) or arrays broadcastable against x (per channel / token).
      bits: static Python int in 2..16.
      symmetric: static bool; True = signed symmetric grid, False = asymmetric [0, 2^b - 1].
    Returns:
      Array of x's shape and dtype holding at most 2^bits distinct values.
    """
    bits = check_bits(bits)
    symmetric = _check_symmetric(symmetric)
    qmin, qmax = int_grid(bits, symmetric)
    x = jnp.asarray(x)
    dtype = _compute_dtype(x.dtype)
    xf = x.astype(dtype)
    s, z = scale_and_zero_point(
        jax.lax.stop_gradient(x_min), jax.lax.stop_gradient(x_max), bits, symmetric
    )
    if jnp.broadcast_shapes(x.shape, s.shape) != x.shape:
        raise ValueError(
            f"x_min / x_max of shape {s.shape} must broadcast against x of shape {x.shape}"
        )
    s, z = s.astype(dtype), z.astype(dtype)
    valid = s > 0
    safe_s = jnp.where(valid, s, 1)
    x_const = jax.lax.stop_gradient(xf)
    q_int = jnp.round(x_const / safe_s) + z
    xq = jnp.where(valid, safe_s * (jnp.clip(q_int, qmin, qmax) - z), 0)
    passes = valid & (q_int >= qmin) & (q_int <= qmax)
    # (xf - x_const) is exactly 0 in the forward pass and carries d/dx = 1 backwards.
    out = xq + jnp.where(passes, xf - x_const, 0)
    return out.astype(x.dtype)


def fake_quant_per_channel(
    w: jax.Array, bits: int, axis: int = -1, symmetric: bool = True
) -> jax.Array:
    """Fake-quantize w with a min-max range per channel along `axis` (weights).

    Args:
      w: any shape (..., C, ...); for a Flax Dense kernel (in, out) use axis=-1.
      bits: static int in 2..16.
      axis: the channel axis; the range is reduced over every other axis.
      symmetric: static bool (weights: True).
    Returns:
      Array of w's shape and dtype.
    """
    w = jnp.asarray(w)
    axis = _check_axis(axis, w.ndim)
    reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
    lo = jnp.min(w, axis=reduce_axes, keepdims=True)
    hi = jnp.max(w, axis=reduce_axes, keepdims=True)
    return fake_quant(w, lo, hi, bits, symmetric)


def fake_quant_per_token(x: jax.Array, bits: int, symmetric: bool = False) -> jax.Array:
    """Dynamic per-token fake quantization: the range of each token is its min / max over d.

    Args:
      x: (..., d); every leading index is one token.
      bits: static int in 2..16.
      symmetric: static bool (activations: False).
    Returns:
      Array of x's shape and dtype.
    """
    x = jnp.asarray(x)
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True)
    return fake_quant(x, lo, hi, bits, symmetric)


def _check_axis(axis: Any, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or not -ndim <= int(axis) < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim - 1}], got {axis!r}")
    return int(axis) % ndim


def _check_num_candidates(num_candidates: Any) -> int:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)) \
            or num_candidates < 1:
        raise ValueError(f"num_candidates must be a static int >= 1, got {num_candidates!r}")
    return int(num_candidates)


def _check_margin(margin: Any) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.floating)) \
            or not 0 <= float(margin) < float("inf"):
        raise ValueError(f"margin must be a static finite number >= 0, got {margin!r}")
    return float(margin)


def candidate_ranges(
    x_min: ArrayLike, x_max: ArrayLike, num_candidates: int, symmetric: bool,
    margin: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """The MSE search grid: fractions i / N (i = 1..N) of the base range [x_min, x_max].

    Asymmetric: the base range is widened to include 0, candidate i = (x_min, x_max) * i / N.
    Symmetric: a = max(|x_min|, |x_max|), candidate i = (-a, a) * i / N.
    `margin` widens the base range before the grid is laid: a + margin (symmetric), and
    x_max + margin, x_min - margin where x_min < 0 (asymmetric). The reference's weight search
    uses margin 0.5 (`range_margin`), so its grid spans max|w| + 0.5 in steps of
    (max|w| + 0.5) / N; margin 0 spans max|w|.

    Args:
      x_min, x_max: scalars, the base (min-max) range.
      num_candidates: static int N >= 1.
      symmetric: static bool.
      margin: static float >= 0 added to the base range (see above).
    Returns:
      (candidates_min, candidates_max), each (N,) float32 (or wider).
    """
    n = _check_num_candidates(num_candidates)
    symmetric = _check_symmetric(symmetric)
    margin = _check_margin(margin)
    lo = jnp.asarray(x_min)
    hi = jnp.asarray(x_max)
    dtype = _compute_dtype(jnp.result_type(lo, hi))
    lo, hi = lo.astype(dtype), hi.astype(dtype)
    if symmetric:
        hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        lo = -hi
    else:
        lo, hi = jnp.minimum(lo, 0), jnp.maximum(hi, 0)
    if margin:
        hi = hi + margin
        lo = jnp.where(lo < 0, lo - margin, lo)
    index = jnp.arange(1, n + 1, dtype=dtype)
    if margin:
        # The reference's order of operations: step = span / N, candidate i = step * i.
        return (lo / n) * index, (hi / n) * index
    return lo * (index / n), hi * (index / n)


def mse_losses(
    x: jax.Array,
    candidates_min: jax.Array,
    candidates_max: jax.Array,
    bits: int,
    symmetric: bool,
) -> jax.Array:
    """Mean squared quantization error of x for each candidate range.

    Candidates are evaluated one after another (lax.map), so memory stays O(x.size).

    Args:
      x: any shape.
      candidates_min, candidates_max: (N,) candidate ranges.
      bits: static int in 2..16.
      symmetric: static bool.
    Returns:
      (N,) float32 (or wider): mean((fake_quant(x, cmin_i, cmax_i) - x)^2).
    """
    bits = check_bits(bits)
    symmetric = _check_symmetric(symmetric)
    x = jax.lax.stop_gradient(jnp.asarray(x))
    xf = x.astype(_compute_dtype(x.dtype))
    cmin = jax.lax.stop_gradient(jnp.asarray(candidates_min))
    cmax = jax.lax.stop_gradient(jnp.asarray(candidates_max))
    if cmin.ndim != 1 or cmin.shape != cmax.shape:
        raise ValueError(
            f"candidates_min / candidates_max must both be (N,), got {cmin.shape} / {cmax.shape}"
        )

    def one(c: tuple[jax.Array, jax.Array]) -> jax.Array:
        return jnp.mean(jnp.square(fake_quant(xf, c[0], c[1], bits, symmetric) - xf))

    return jax.lax.map(one, (cmin, cmax))


def mse_range_search(
    x: jax.Array,
    bits: int,
    symmetric: bool,
    num_candidates: int = 100,
    axis: int | None = None,
    margin: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Range minimising the MSE of fake_quant(x) over `candidate_ranges` of x's min-max range.

    Ties go to the smallest candidate index (jnp.argmin).

    Args:
      x: any shape.
      bits: static int in 2..16.
      symmetric: static bool.
      num_candidates: static int N >= 1.
      axis: None for one range per tensor; an int for one range per channel along that axis.
      margin: static float >= 0 widening the searched span (see `candidate_ranges`).
    Returns:
      (x_min, x_max): scalars if axis is None, else arrays of x.ndim dims with size 1 everywhere
      but `axis` (broadcastable against x, so fake_quant(x, *result, ...) works directly).
    """
    x = jax.lax.stop_gradient(jnp.asarray(x))
    if axis is None:
        cmin, cmax = candidate_ranges(jnp.min(x), jnp.max(x), num_candidates, symmetric,
                                      margin)
        best = jnp.argmin(mse_losses(x, cmin, cmax, bits, symmetric))
        return cmin[best], cmax[best]
    axis = _check_axis(axis, x.ndim)
    rows = jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    search = jax.vmap(lambda r: mse_range_search(r, bits, symmetric, num_candidates,
                                                 margin=margin))
    lo, hi = search(rows)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return lo.reshape(shape), hi.reshape(shape)
