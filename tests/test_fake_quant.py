"""fake_quant (paper Eq. 1) against a direct NumPy implementation; STE gradient; MSE search."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers.ops import quant


def np_fake_quant(x, x_min, x_max, bits, symmetric):
    """Eq. 1 in float32 NumPy: s * (clip(round(x / s) + z, qmin, qmax) - z)."""
    x = np.asarray(x, np.float32)
    x_min, x_max = np.float32(x_min), np.float32(x_max)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = np.maximum(np.abs(x_min), np.abs(x_max)) / np.float32(qmax)
        z = np.float32(0)
    else:
        qmin, qmax = 0, 2**bits - 1
        x_min, x_max = np.minimum(x_min, 0), np.maximum(x_max, 0)
        s = (x_max - x_min) / np.float32(qmax)
        z = np.round(-x_min / s)
    q = np.clip(np.round(x / s) + z, qmin, qmax)  # np.round: half to even
    return (s * (q - z)).astype(np.float32)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", list(range(2, 17)))
def test_matches_numpy_eq1(bits, symmetric):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=512).astype(np.float32) * 3
    x_min, x_max = -2.5, 1.7  # values outside the range get clipped
    got = np.asarray(quant.fake_quant(jnp.asarray(x), x_min, x_max, bits, symmetric))
    want = np_fake_quant(x, x_min, x_max, bits, symmetric)
    np.testing.assert_array_equal(got, want)
    assert np.unique(got).size <= 2**bits


def test_round_half_to_even_and_clipping():
    # asymmetric 3 bits on [-1, 2.5]: s = 0.5, z = 2, grid values s * (0..7 - 2) = -1 .. 2.5
    x = np.array([0.25, 0.75, -0.25, -0.75, 1.25, -5.0, 9.0], np.float32)
    got = np.asarray(quant.fake_quant(jnp.asarray(x), -1.0, 2.5, 3, False))
    # x / s = 0.5 -> 0, 1.5 -> 2, -0.5 -> -0, -1.5 -> -2, 2.5 -> 2 (all half to even)
    np.testing.assert_array_equal(got, [0.0, 1.0, 0.0, -1.0, 1.0, -1.0, 2.5])
    # symmetric 4 bits on max|x| = 7: s = 1, grid -8..7
    x = np.array([0.5, 1.5, 2.5, -0.5, -3.5, -8.4, -9.0, 7.6], np.float32)
    got = np.asarray(quant.fake_quant(jnp.asarray(x), -7.0, 7.0, 4, True))
    np.testing.assert_array_equal(got, [0.0, 2.0, 2.0, 0.0, -4.0, -8.0, -8.0, 7.0])


def test_range_forced_to_include_zero_and_weight_scale():
    x = jnp.array([0.0, 1.0, 3.0])
    # asymmetric range [1, 3] is widened to [0, 3]: 0 stays exactly representable
    got = quant.fake_quant(x, 1.0, 3.0, 8, False)
    np.testing.assert_allclose(got, [0.0, 1.0, 3.0], atol=3 / 255 / 2)
    assert got[0] == 0.0
    s, z = quant.scale_and_zero_point(-0.3, 1.27, 8, True)
    np.testing.assert_allclose(s, 1.27 / 127, rtol=1e-7)
    assert z == 0


def test_per_channel_and_scalar_broadcast_match_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    got = np.asarray(quant.fake_quant_per_channel(jnp.asarray(w), 8, axis=-1))
    want = np.stack(
        [np_fake_quant(w[:, c], w[:, c].min(), w[:, c].max(), 8, True) for c in range(4)], 1
    )
    # rtol of a few ulp: XLA may evaluate s with a reciprocal; one grid step is >> 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    got = np.asarray(quant.fake_quant_per_token(jnp.asarray(x), 4))
    want = np.stack([
        np.stack([np_fake_quant(x[b, t], x[b, t].min(), x[b, t].max(), 4, False)
                  for t in range(3)]) for b in range(2)
    ])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_per_channel_beats_per_tensor_with_one_huge_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    w[:, 3] *= 100.0
    w = jnp.asarray(w)
    per_tensor = quant.fake_quant(w, jnp.min(w), jnp.max(w), 8, True)
    per_channel = quant.fake_quant_per_channel(w, 8, axis=1)
    err_t = np.mean(np.asarray(per_tensor - w) ** 2, axis=0)
    err_c = np.mean(np.asarray(per_channel - w) ** 2, axis=0)
    normal = np.arange(8) != 3
    # the huge channel sets the per-tensor step, wiping out the other channels' resolution
    assert np.all(err_c[normal] < 1e-3 * err_t[normal])
    np.testing.assert_allclose(err_c[3], err_t[3], rtol=0.05)
    assert err_c.mean() < 0.2 * err_t.mean()


@pytest.mark.parametrize("symmetric", [False, True])
def test_clipped_ste_gradient(symmetric):
    x = jnp.linspace(-4.0, 4.0, 81)
    x_min, x_max, bits = -1.3, 2.1, 3
    grad = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, x_min, x_max, bits, symmetric)))(x)
    # reference rule: 1 where round(x / s) + z lies on the integer grid, else 0
    xn = np.asarray(x, np.float32)
    if symmetric:
        qmin, qmax = -4, 3
        s, z = np.float32(2.1) / np.float32(3), 0.0
    else:
        qmin, qmax = 0, 7
        s = (np.float32(2.1) - np.float32(-1.3)) / np.float32(7)
        z = np.round(np.float32(1.3) / s)
    q = np.round(xn / s) + z
    want = ((q >= qmin) & (q <= qmax)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(grad), want)
    assert 0 < want.sum() < want.size  # both regimes are exercised
    # ranges are calibrated constants: no gradient flows into them
    g_rng = jax.grad(lambda lo: jnp.sum(quant.fake_quant(x, lo, x_max, bits, symmetric)))(x_min)
    assert g_rng == 0.0


def test_zero_range_and_dtype():
    z = quant.fake_quant(jnp.zeros((3,)), 0.0, 0.0, 8, False)
    np.testing.assert_array_equal(z, 0.0)
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, 0.0, 0.0, 8, True)))(jnp.ones(3))
    assert np.all(np.isfinite(g))
    per_ch = quant.fake_quant_per_channel(jnp.zeros((4, 2)), 8)
    np.testing.assert_array_equal(per_ch, 0.0)
    xb = jnp.linspace(-1, 1, 7, dtype=jnp.bfloat16)
    out = quant.fake_quant(xb, -1.0, 1.0, 8, False)
    assert out.dtype == jnp.bfloat16 and out.shape == xb.shape
    jitted = jax.jit(quant.fake_quant, static_argnums=(3, 4))
    np.testing.assert_array_equal(jitted(xb, -1.0, 1.0, 8, False), out)


@pytest.mark.parametrize("bits", [1, 17, 8.0, True, "8"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quant.fake_quant(jnp.ones(3), -1.0, 1.0, bits, True)


def test_bad_range_shape_and_symmetric():
    with pytest.raises(ValueError, match="broadcast"):
        quant.fake_quant(jnp.ones((3,)), jnp.zeros((2, 3)), 1.0, 8, True)
    with pytest.raises(ValueError, match="symmetric"):
        quant.fake_quant(jnp.ones((3,)), 0.0, 1.0, 8, "yes")


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_picks_minimiser_of_its_losses(symmetric):
    rng = np.random.default_rng(2)
    x = rng.standard_t(df=3, size=2000).astype(np.float32) + (0.0 if symmetric else 1.0)
    bits, n = 4, 50
    cmin, cmax = quant.candidate_ranges(x.min(), x.max(), n, symmetric)
    frac = np.arange(1, n + 1) / n
    if symmetric:
        a = max(abs(x.min()), abs(x.max()))
        np.testing.assert_allclose(cmax, a * frac, rtol=1e-6)
        np.testing.assert_allclose(cmin, -a * frac, rtol=1e-6)
    else:
        np.testing.assert_allclose(cmin, min(x.min(), 0) * frac, rtol=1e-6)
        np.testing.assert_allclose(cmax, x.max() * frac, rtol=1e-6)
    losses = np.asarray(quant.mse_losses(jnp.asarray(x), cmin, cmax, bits, symmetric))
    want = [np.mean((np_fake_quant(x, lo, hi, bits, symmetric) - x) ** 2)
            for lo, hi in zip(np.asarray(cmin), np.asarray(cmax))]
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    lo, hi = quant.mse_range_search(jnp.asarray(x), bits, symmetric, num_candidates=n)
    best = int(np.argmin(want))
    np.testing.assert_allclose([lo, hi], [cmin[best], cmax[best]], rtol=1e-6)
    assert 0 < best < n - 1  # heavy tails: the optimum clips, and is not the smallest range


def test_mse_search_per_channel():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(32, 3)).astype(np.float32) * np.array([1.0, 10.0, 0.1], np.float32)
    lo, hi = quant.mse_range_search(jnp.asarray(w), 4, True, num_candidates=20, axis=1)
    assert lo.shape == (1, 3) and hi.shape == (1, 3)
    for c in range(3):
        lc, hc = quant.mse_range_search(jnp.asarray(w[:, c]), 4, True, num_candidates=20)
        np.testing.assert_allclose([lo[0, c], hi[0, c]], [lc, hc], rtol=1e-6)
