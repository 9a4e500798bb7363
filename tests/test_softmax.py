"""clipped_softmax / softmax1 against NumPy references, masks, and the boundary gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers import clipped_softmax, gamma_from_alpha, softmax1
from qtransformers.ops.softmax import get_softmax_fn, softmax


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_clipped_softmax(x, gamma, zeta):
    return np.clip((zeta - gamma) * np_softmax(x) + gamma, 0.0, 1.0)


@pytest.mark.parametrize("gamma,zeta", [(0.0, 1.0), (-0.025, 1.0), (-0.1, 1.0), (-0.03, 1.003),
                                        (-0.2, 1.5)])
def test_clipped_softmax_matches_numpy(gamma, zeta):
    x = np.random.default_rng(0).normal(scale=3.0, size=(3, 4, 7, 9)).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: clipped_softmax(v, gamma, zeta))(x))
    np.testing.assert_allclose(got, np_clipped_softmax(x.astype(np.float64), gamma, zeta),
                               atol=2e-6)


def test_identity_parameters_equal_softmax():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 11)) * 4
    np.testing.assert_allclose(clipped_softmax(x), jax.nn.softmax(x), atol=1e-7)


def test_exact_zeros_below_threshold():
    gamma, zeta = -0.05, 1.0
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 32)) * 3
    p = np.asarray(jax.nn.softmax(x))
    out = np.asarray(clipped_softmax(x, gamma, zeta))
    threshold = -gamma / (zeta - gamma)
    below = p < threshold - 1e-6
    assert below.any() and (p > threshold + 1e-6).any()
    assert np.all(out[below] == 0.0)
    assert np.all(out[p > threshold + 1e-6] > 0.0)


def test_masked_keys_exactly_zero_all_variants():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5, 6))
    mask = jnp.array([True, True, False, True, False, True])[None, None, None]
    for name, kw in [("vanilla", {}), ("clipped", dict(gamma=-0.02)), ("clipped", {}),
                     ("softmax1", {})]:
        out = get_softmax_fn(name, **kw)(x, where=mask)
        assert np.all(np.asarray(out)[..., ~np.asarray(mask[0, 0, 0])] == 0.0), name
    # The unmasked entries equal a softmax over the unmasked keys only.
    kept = np.asarray(x)[..., np.asarray(mask[0, 0, 0])]
    np.testing.assert_allclose(np.asarray(softmax(x, where=mask))[..., np.asarray(mask[0, 0, 0])],
                               np_softmax(kept), atol=1e-6)


def test_boundary_gradient_passes_where_softmax_is_one():
    # First row of causal attention: one visible key, softmax == 1 exactly, so with zeta == 1
    # and gamma == 0 the stretched value sits exactly on the clip boundary 1. The reference
    # (torch.clamp) passes the gradient there: d out / d zeta = softmax = 1 for that entry.
    mask = jnp.array([[True, False, False], [True, True, False]])
    x = jnp.array([[0.3, -1.0, 2.0], [0.1, 0.4, 0.2]])
    grad_zeta = jax.grad(lambda z: clipped_softmax(x, 0.0, z, where=mask)[0, 0])(1.0)
    assert float(grad_zeta) == 1.0
    # jnp.clip splits the gradient 0.5 / 0.5 at the tie; a clip built on it would give 0.5.
    naive = jax.grad(lambda z: jnp.clip(z * jax.nn.softmax(jnp.where(mask, x, -1e9))[0, 0],
                                        0.0, 1.0))(1.0)
    assert float(naive) == 0.5
    # Clipped entries get no gradient; interior entries get the full one.
    y = jnp.array([-0.1, 0.0, 0.5, 1.0, 1.2])
    from qtransformers.ops.softmax import _clip_unit_interval
    grad = jax.grad(lambda t: jnp.sum(_clip_unit_interval(t) * jnp.arange(1.0, 6.0)))(y)
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 2.0, 3.0, 4.0, 0.0])


def test_gradient_matches_numeric_away_from_boundaries():
    x = jax.random.normal(jax.random.PRNGKey(3), (6,)) * 2
    f = lambda v: jnp.sum(clipped_softmax(v, -0.05, 1.02) * jnp.arange(6.0))
    g = np.asarray(jax.grad(f)(x))
    eps = 1e-3
    num = [(f(x.at[i].add(eps)) - f(x.at[i].add(-eps))) / (2 * eps) for i in range(6)]
    np.testing.assert_allclose(g, np.asarray(num), atol=2e-3)


def test_softmax1_matches_numpy_and_is_stable():
    x = np.random.default_rng(4).normal(scale=5, size=(4, 9)).astype(np.float32)
    e = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(softmax1(x)), e / (1 + e.sum(-1, keepdims=True)),
                               rtol=1e-5)
    big = np.asarray(softmax1(jnp.array([[1000.0, 999.0, -5.0]])))
    np.testing.assert_allclose(big, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0]],
                               atol=1e-6)
    # A head whose logits are all very negative attends to (almost) nothing.
    assert float(softmax1(jnp.array([-50.0, -60.0])).sum()) < 1e-20


def test_vmap_and_gamma_from_alpha():
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 4, 8))
    out = jax.vmap(lambda v: clipped_softmax(v, -0.1))(x)
    np.testing.assert_allclose(out, clipped_softmax(x, -0.1), atol=1e-7)
    assert gamma_from_alpha(12, 512) == pytest.approx(-0.0234375)
    assert gamma_from_alpha(4, 128) == -4 / 128


@pytest.mark.parametrize("kwargs,field", [(dict(gamma=0.1), "gamma"), (dict(zeta=0.9), "zeta")])
def test_bad_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        clipped_softmax(jnp.zeros((2, 3)), **kwargs)
    with pytest.raises(ValueError, match="softmax"):
        get_softmax_fn("sparsemax")
