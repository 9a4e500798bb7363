"""Range estimators folded over several batches, against NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers.ops import quant
from qtransformers.quant import estimators


def _batches(n=4, shape=(4, 8, 16), seed=0):
    rng = np.random.default_rng(seed)
    # different scales and offsets per batch so every batch changes min and max
    return [
        (rng.normal(size=shape) * (1.0 + i) + 0.3 * i).astype(np.float32) for i in range(n)
    ]


def _fold(est, batches, **kw):
    state = est.init()
    for b in batches:
        state = est.update(state, jax.device_get(est.batch_stats(jnp.asarray(b), **kw)))
    return state


def test_current_minmax_is_last_batch():
    batches = _batches()
    lo, hi = estimators.get_estimator("current_minmax").finalize(
        _fold(estimators.get_estimator("current_minmax"), batches)
    )
    assert lo == batches[-1].min() and hi == batches[-1].max()


def test_running_minmax_momentum():
    batches = _batches(n=5)
    est = estimators.get_estimator("running_minmax")
    state = _fold(est, batches)
    ref_lo, ref_hi = batches[0].min(), batches[0].max()  # first batch initialises
    for b in batches[1:]:
        ref_lo = 0.1 * b.min() + 0.9 * ref_lo
        ref_hi = 0.1 * b.max() + 0.9 * ref_hi
    lo, hi = est.finalize(state)
    assert state.count == 5
    np.testing.assert_allclose([lo, hi], [ref_lo, ref_hi], rtol=1e-6)
    assert lo.dtype == np.float32


def test_percentile_running_average_and_order():
    batches = _batches(n=3, shape=(8, 64, 32))
    p = 99.9
    est = estimators.get_estimator("percentile", percentile=p)
    stats = jax.device_get(est.batch_stats(jnp.asarray(batches[0])))
    # the low percentile gives the min, the high percentile the max
    np.testing.assert_allclose(stats["low"], np.percentile(batches[0], 100 - p), rtol=1e-5)
    np.testing.assert_allclose(stats["high"], np.percentile(batches[0], p), rtol=1e-5)
    assert batches[0].min() < stats["low"] < 0 < stats["high"] < batches[0].max()
    ref_lo, ref_hi = np.percentile(batches[0], [100 - p, p])
    for b in batches[1:]:
        lo_b, hi_b = np.percentile(b, [100 - p, p])
        ref_lo, ref_hi = 0.1 * lo_b + 0.9 * ref_lo, 0.1 * hi_b + 0.9 * ref_hi
    lo, hi = est.finalize(_fold(est, batches))
    np.testing.assert_allclose([lo, hi], [ref_lo, ref_hi], rtol=1e-5)


def _np_mse(x, lo, hi, bits, symmetric):
    """Mean squared error of Eq. 1 in float64 NumPy."""
    x = x.astype(np.float64)
    if symmetric:
        qmin, qmax, s = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, max(abs(lo), abs(hi))
        s, z = s / qmax, 0.0
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = (hi - lo) / qmax
        z = np.round(-lo / s)
    q = s * (np.clip(np.round(x / s) + z, qmin, qmax) - z)
    return np.mean((q - x) ** 2)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_accumulates_losses_and_picks_argmin(symmetric):
    batches = _batches(n=3)
    batches[1][0, 0, :4] = 40.0  # an outlier in one batch only: clipping it must pay off
    bits, n = 4, 40
    est = estimators.get_estimator("mse", bits=bits, symmetric=symmetric, num_candidates=n)
    state = est.init()
    assert est.search_range(state) is None
    for b in batches:
        stats = jax.device_get(est.batch_stats(jnp.asarray(b), est.search_range(state)))
        assert set(stats) == {"losses", "range_min", "range_max"}
        state = est.update(state, stats)
    # the grid is fixed by the first batch's min-max range
    np.testing.assert_allclose(
        est.search_range(state), [batches[0].min(), batches[0].max()], rtol=1e-7
    )
    base_lo, base_hi = float(batches[0].min()), float(batches[0].max())
    if symmetric:
        a = max(abs(base_lo), abs(base_hi))
        base_lo, base_hi = -a, a
    frac = np.arange(1, n + 1) / n
    cands = [(min(base_lo, 0.0) * f, max(base_hi, 0.0) * f) for f in frac]
    ref = np.array([sum(_np_mse(b, lo, hi, bits, symmetric) for b in batches) for lo, hi in cands])
    np.testing.assert_allclose(state.losses, ref, rtol=1e-4)
    lo, hi = est.finalize(state)
    best = int(np.argmin(state.losses))
    assert best == int(np.argmin(ref))
    np.testing.assert_allclose([lo, hi], cands[best], rtol=1e-6)
    # the chosen range is the minimiser of its own accumulated loss
    assert state.losses[best] == state.losses.min()


def test_mse_rejects_stats_on_another_grid():
    batches = _batches(n=2)
    est = estimators.get_estimator("mse", num_candidates=10)
    state = est.update(est.init(), jax.device_get(est.batch_stats(jnp.asarray(batches[0]))))
    other = jax.device_get(est.batch_stats(jnp.asarray(batches[1])))  # its own range: wrong
    with pytest.raises(ValueError, match="search_range"):
        est.update(state, other)


def test_batch_stats_is_small_and_jittable():
    x = jnp.asarray(_batches(n=1, shape=(2, 16, 32))[0])
    for name in estimators.ESTIMATOR_NAMES:
        fn = jax.jit(lambda v, name=name: estimators.batch_stats(v, name, num_candidates=8))
        stats = fn(x)
        assert all(np.size(v) <= 8 for v in stats.values())
    lo_hi = estimators.batch_stats(x, "running_minmax")
    assert lo_hi["min"] == x.min() and lo_hi["max"] == x.max()
    eager = estimators.batch_stats(x, "mse", bits=6, num_candidates=8)
    cmin, cmax = quant.candidate_ranges(x.min(), x.max(), 8, False)
    np.testing.assert_allclose(
        eager["losses"], quant.mse_losses(x, cmin, cmax, 6, False), rtol=1e-5
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match="current_minmax"):
        estimators.get_estimator("ema")
    with pytest.raises(ValueError, match="estimator name"):
        estimators.batch_stats(jnp.ones(3), "minmax")
    for p in (50, 30.0, 100.5):
        with pytest.raises(ValueError, match=r"percentile.*\(50, 100\]"):
            estimators.get_estimator("percentile", percentile=p)
        with pytest.raises(ValueError, match="percentile"):
            estimators.batch_stats(jnp.ones(3), "percentile", percentile=p)
    estimators.get_estimator("percentile", percentile=100)  # the upper end is allowed
    with pytest.raises(ValueError, match="bits"):
        estimators.get_estimator("mse", bits=17)
    with pytest.raises(ValueError, match="momentum"):
        estimators.get_estimator("running_minmax", momentum=1.0)
    with pytest.raises(ValueError, match="options"):
        estimators.get_estimator("running_minmax", percentile=99.0)
    with pytest.raises(ValueError, match="at least one"):
        estimators.get_estimator("running_minmax").finalize(estimators.MinMaxState(None, None, 0))
    with pytest.raises(ValueError, match="'max'"):
        est = estimators.get_estimator("running_minmax")
        est.update(est.init(), {"min": 0.0})
