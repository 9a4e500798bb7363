"""Interceptor PTQ on a stock Flax model equals a manual fake_quant composition."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers.ops.quant import fake_quant
from qtransformers.quant import (OutputInterceptor, QuantConfig, calibrate_intercepted,
                                 quantize_params, quantized_apply)


class StockMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(x)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4, name="head")(x)


def fq(x, r):
    return fake_quant(x, r["x_min"], r["x_max"], 8, False)


def test_intercepted_mlp_matches_manual_composition():
    model = StockMLP()
    xs = [jax.random.normal(jax.random.PRNGKey(i), (6, 8)) * 3 for i in range(2)]
    params = model.init(jax.random.PRNGKey(9), xs[0])["params"]
    config = QuantConfig(act_estimator="current_minmax", num_calibration_batches=1,
                         head_patterns=(r"^head/",))
    interceptor = OutputInterceptor((nn.Dense, nn.LayerNorm), r"^(?!head$)")
    qparams = quantize_params(params, config)
    assert np.array_equal(qparams["head"]["kernel"], params["head"]["kernel"])  # head excluded
    qranges = calibrate_intercepted(model, qparams, xs[:1], config, interceptor)
    assert set(qranges) == {"LayerNorm_0", "Dense_0"}

    # Sequential calibration: Dense_0's range is taken on the quantized LayerNorm output.
    ln = nn.LayerNorm().apply({"params": qparams["LayerNorm_0"]}, xs[0])
    np.testing.assert_allclose([qranges["LayerNorm_0"]["x_min"], qranges["LayerNorm_0"]["x_max"]],
                               [ln.min(), ln.max()], rtol=1e-6)
    h = nn.Dense(16).apply({"params": qparams["Dense_0"]}, fq(ln, qranges["LayerNorm_0"]))
    np.testing.assert_allclose([qranges["Dense_0"]["x_min"], qranges["Dense_0"]["x_max"]],
                               [h.min(), h.max()], rtol=1e-6)

    x = xs[1]  # another input: values beyond the calibrated ranges get clipped
    y = quantized_apply(model, qparams, qranges, x, config, interceptor)
    ln = fq(nn.LayerNorm().apply({"params": qparams["LayerNorm_0"]}, x), qranges["LayerNorm_0"])
    h = fq(nn.Dense(16).apply({"params": qparams["Dense_0"]}, ln), qranges["Dense_0"])
    ref = nn.Dense(4).apply({"params": qparams["head"]}, jax.nn.relu(h))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y, model.apply({"params": qparams}, x), atol=1e-6)

    dynamic = config.replace(act_granularity="per_token")
    y_tok = quantized_apply(model, qparams, None, x, dynamic, interceptor)
    ln = nn.LayerNorm().apply({"params": qparams["LayerNorm_0"]}, x)
    ln = fake_quant(ln, ln.min(-1, keepdims=True), ln.max(-1, keepdims=True), 8, False)
    h = nn.Dense(16).apply({"params": qparams["Dense_0"]}, ln)
    h = fake_quant(h, h.min(-1, keepdims=True), h.max(-1, keepdims=True), 8, False)
    ref = nn.Dense(4).apply({"params": qparams["head"]}, jax.nn.relu(h))
    np.testing.assert_allclose(y_tok, ref, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match=r"missing \['Dense_0'\]"):
        quantized_apply(model, qparams, {"LayerNorm_0": qranges["LayerNorm_0"]}, x, config,
                        interceptor)
    with pytest.raises(ValueError, match="module_types"):
        OutputInterceptor((jnp.tanh,))
