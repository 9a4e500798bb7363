"""quantize_params: which leaves change, closed-form grids, per-channel ranges, boxes kept."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers import build_model, get_model_config
from qtransformers.quant import QuantConfig, quantize_params, quantized_param_paths
from qtransformers.pytree import path_to_str
from qtransformers.quant.params import channel_axes


@pytest.fixture(scope="module")
def bert_params():
    cfg = get_model_config("bert_tiny", num_layers=1, gate="mlp")
    ids = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(build_model(cfg).init)  # one compile instead of eager op-by-op init
    return init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids))["params"]


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    return {path_to_str(p): v for p, v in leaves}


def _np_symmetric(w, bits=8):
    s = np.abs(w).max() / (2 ** (bits - 1) - 1)
    return np.clip(np.round(w / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


def test_untouched_leaves_are_bit_identical_and_quantized_have_few_values(bert_params):
    out = quantize_params(bert_params, QuantConfig())
    before, after = _flat(bert_params), _flat(out)
    quantized = set(quantized_param_paths(bert_params, QuantConfig()))
    assert "mlm_head/transform/kernel" not in quantized
    assert "encoder/layers_0/attention/gate/hidden_kernel" not in quantized
    assert "word_embeddings/embedding" in quantized
    assert "encoder/layers_0/mlp_ln/norm/scale" in quantized
    for path, leaf in after.items():
        assert isinstance(leaf, nn.Partitioned) == isinstance(before[path], nn.Partitioned)
        old, new = np.asarray(nn.meta.unbox(before[path])), np.asarray(nn.meta.unbox(leaf))
        if path in quantized:
            assert len(np.unique(new)) <= 256, path
            assert old.ndim == 1 or not np.array_equal(old, new), path
        else:
            assert path.endswith("bias") or "gate" in path or path.startswith("mlm_head"), path
            np.testing.assert_array_equal(old, new)
            assert old.tobytes() == new.tobytes()


def test_per_tensor_minmax_matches_numpy_and_mse_is_no_worse(bert_params):
    flat = _flat(bert_params)
    path = "encoder/layers_0/mlp/intermediate/kernel"
    w = np.asarray(flat[path].unbox())
    got = np.asarray(_flat(quantize_params(bert_params, QuantConfig()))[path].unbox())
    np.testing.assert_allclose(got, _np_symmetric(w), rtol=1e-6, atol=1e-9)
    cfg4 = QuantConfig(weight_bits=4, weight_estimator="mse")
    mse = np.asarray(_flat(quantize_params(bert_params, cfg4))[path].unbox())
    assert len(np.unique(mse)) <= 16
    err_mse = np.mean((mse - w) ** 2)
    err_minmax = np.mean((_np_symmetric(w, 4) - w) ** 2)
    assert err_mse < 0.8 * err_minmax  # at 4 bits clipping the tails pays off


def test_per_channel_ranges(bert_params):
    cfg = QuantConfig(weight_granularity="per_channel")
    flat, out = _flat(bert_params), _flat(quantize_params(bert_params, cfg))
    dense = "encoder/layers_0/mlp/output/kernel"  # (d_ff, d): one range per output column
    w = np.asarray(flat[dense].unbox())
    ref = np.stack([_np_symmetric(w[:, j]) for j in range(w.shape[1])], axis=1)
    np.testing.assert_allclose(np.asarray(out[dense].unbox()), ref, rtol=1e-6, atol=1e-9)
    query = "encoder/layers_0/attention/query/kernel"  # (d, H, D): one range per (h, dd)
    w = np.asarray(flat[query].unbox())
    ref = np.empty_like(w)
    for h in range(w.shape[1]):
        for j in range(w.shape[2]):
            ref[:, h, j] = _np_symmetric(w[:, h, j])
    np.testing.assert_allclose(np.asarray(out[query].unbox()), ref, rtol=1e-6, atol=1e-9)
    emb = "word_embeddings/embedding"  # (V, d): one range per row
    w = np.asarray(flat[emb].unbox())
    ref = np.stack([_np_symmetric(w[i]) for i in range(w.shape[0])])
    np.testing.assert_allclose(np.asarray(out[emb].unbox()), ref, rtol=1e-6, atol=1e-9)
    assert channel_axes("encoder/layers_0/attention/out/kernel", 3) == (2,)
    assert channel_axes("encoder/layers_0/mlp_ln/norm/scale", 1) == ()


def test_jittable_and_plain_dicts(bert_params):
    plain = nn.meta.unbox(bert_params)
    cfg = QuantConfig()
    eager = quantize_params(plain, cfg)
    jitted = jax.jit(quantize_params, static_argnums=1)(plain, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, eager, jitted)
    with pytest.raises(ValueError, match="QuantConfig"):
        quantize_params(plain, {"weight_bits": 8})
