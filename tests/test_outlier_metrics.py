"""Outlier metrics (paper §5) against a NumPy implementation of the reference formula."""
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers.ops import metrics


def np_kurtosis(sample):
    """Reference: flatten, E[(x - mu)^4] / (std_unbiased^4 + 1e-6)."""
    x = np.asarray(sample, np.float64).reshape(-1)
    return np.mean((x - x.mean()) ** 4) / (np.std(x, ddof=1) ** 4 + 1e-6)


def test_kurtosis_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=5, size=(3, 10, 8)).astype(np.float32) * 2 + 0.5
    got = np.asarray(metrics.kurtosis_per_sample(jnp.asarray(x)))
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, [np_kurtosis(s) for s in x], rtol=1e-4)
    np.testing.assert_allclose(
        metrics.excess_kurtosis_per_sample(jnp.asarray(x)), got - 3.0, rtol=1e-6
    )


def test_gaussian_kurtosis_is_three():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 128, 64)).astype(np.float32)  # 8192 values per sample
    k = np.asarray(metrics.kurtosis_per_sample(jnp.asarray(x)))
    # std of the sample kurtosis of n Gaussian values is sqrt(24 / n) ~= 0.054
    np.testing.assert_allclose(k, 3.0, atol=0.25)
    np.testing.assert_allclose(metrics.excess_kurtosis_per_sample(jnp.asarray(x)), 0.0, atol=0.25)


def test_planted_outliers_give_large_kurtosis():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 64, 32)).astype(np.float32)
    x[0, 5, 7] = 200.0  # one outlier dimension in one token (the paper's pattern)
    k = np.asarray(metrics.kurtosis_per_sample(jnp.asarray(x)))
    assert k[0] > 100.0 and abs(k[1] - 3.0) < 0.5
    np.testing.assert_allclose(k[0], np_kurtosis(x[0]), rtol=1e-4)
    inf = np.asarray(metrics.inf_norm_per_sample(jnp.asarray(x)))
    np.testing.assert_allclose(inf, np.abs(x).reshape(2, -1).max(1))
    assert inf[0] == 200.0
    pc = np.asarray(metrics.per_channel_max_abs(jnp.asarray(x)))
    assert pc.shape == (32,) and int(np.argmax(pc)) == 7
    np.testing.assert_allclose(pc, np.abs(x).reshape(-1, 32).max(0))


def test_mask_excludes_padding():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 12, 6)).astype(np.float32)
    lengths = [12, 7]
    where = np.arange(12)[None, :] < np.array(lengths)[:, None]
    x[1, 9, 2] = -500.0  # in padding: must not count
    k = np.asarray(metrics.kurtosis_per_sample(jnp.asarray(x), where=jnp.asarray(where)))
    np.testing.assert_allclose(k, [np_kurtosis(x[b, : lengths[b]]) for b in range(2)], rtol=1e-4)
    inf = np.asarray(metrics.inf_norm_per_sample(jnp.asarray(x), where=jnp.asarray(where)))
    np.testing.assert_allclose(inf, [np.abs(x[b, : lengths[b]]).max() for b in range(2)])
    pc = np.asarray(metrics.per_channel_max_abs(jnp.asarray(x), where=jnp.asarray(where)))
    valid = np.concatenate([x[0], x[1, :7]])
    np.testing.assert_allclose(pc, np.abs(valid).max(0))


def test_bf16_is_upcast():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 32, 16)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    k = metrics.kurtosis_per_sample(xb)
    assert k.dtype == jnp.float32
    ref = [np_kurtosis(s) for s in np.asarray(xb.astype(jnp.float32))]
    np.testing.assert_allclose(k, ref, rtol=1e-4)


def test_aggregate():
    per_tensor = {
        "layer_0/ffn_out": {"inf_norm": 10.0, "kurtosis": 4.0},
        "layer_0/out_ln": {"inf_norm": 30.0, "kurtosis": 20.0},
        "layer_0/residual": {"inf_norm": 50.0},  # inf-norm only
    }
    agg = metrics.aggregate_outlier_metrics(per_tensor)
    assert agg["max_inf_norm"] == 50.0 and agg["max_inf_norm_tensor"] == "layer_0/residual"
    assert agg["avg_kurtosis"] == 12.0
    assert agg["kurtosis"] == {"layer_0/ffn_out": 4.0, "layer_0/out_ln": 20.0}
    assert np.isnan(metrics.aggregate_outlier_metrics({})["avg_kurtosis"])


def test_bad_shapes():
    with pytest.raises(ValueError, match="where"):
        metrics.kurtosis_per_sample(jnp.ones((2, 3, 4)), where=jnp.ones((3, 2), bool))
    with pytest.raises(ValueError, match="ndim"):
        metrics.inf_norm_per_sample(jnp.ones((5,)))
