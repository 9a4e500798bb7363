"""calibrate: NumPy re-computation of ranges, sequential semantics, errors, device / host folds."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers import build_model, get_model_config
from qtransformers.nn.quant_point import QuantContext, QuantPoint, quant_context
from qtransformers.quant import (EstimatorObserver, QuantConfig, TaskApply, batch_stats,
                                 calibrate, discover_points, flatten_points)
from qtransformers.quant.observer import tail_percentiles

B, T = 4, 8


@pytest.fixture(scope="module")
def opt():
    cfg = get_model_config("opt_tiny", num_layers=1)
    model = build_model(cfg)
    ids = jnp.zeros((B, T), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, jnp.ones_like(ids))
                           ["params"])
    return cfg, model, params


def make_batch(cfg, seed, pad=True):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if pad:
        mask[1, -3:] = 0
        mask[3, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@jax.jit(static_argnums=0)
def _capture(model, params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       capture_intermediates=lambda m, _: isinstance(m, QuantPoint),
                       mutable=["intermediates"])


def captured(model, params, batch, site):
    """The FP activation at QuantPoint `site` (its output equals its input without ranges)."""
    _, state = _capture(model, params, batch)
    node = state["intermediates"]
    for name in site.split("/"):
        node = node[name]
    return np.asarray(node["__call__"][0], np.float64)


def test_discovery_order(opt):
    cfg, model, params = opt
    paths = discover_points(TaskApply(model, "clm"), params, make_batch(cfg, 0))
    assert paths[0] == "embeddings_sum" and paths[-1] == "final_ln/output"
    assert len(paths) == 1 + 13 + 1
    assert paths.index("decoder/layers_0/attention/scores") < paths.index(
        "decoder/layers_0/attention/probs")


def test_running_minmax_equals_numpy_on_captured_activations(opt):
    cfg, model, params = opt
    batches = [make_batch(cfg, s) for s in range(3)]
    config = QuantConfig(num_calibration_batches=3)
    ranges = flatten_points(calibrate(model, params, batches, config, sequential=False))
    for site in ("decoder/layers_0/mlp/intermediate_output", "decoder/layers_0/attention/scores"):
        lo = hi = None
        for b in batches:
            x = captured(model, params, b, site)
            m = b["attention_mask"].astype(bool)
            if x.ndim == 4:  # (B, H, T, T): both query and key must be real tokens
                valid = np.broadcast_to(m[:, None, :, None] & m[:, None, None, :], x.shape)
            else:
                valid = np.broadcast_to(m[:, :, None], x.shape)
            bmin, bmax = x[valid].min(), x[valid].max()
            lo = bmin if lo is None else 0.1 * bmin + 0.9 * lo
            hi = bmax if hi is None else 0.1 * bmax + 0.9 * hi
        np.testing.assert_allclose(float(ranges[site]["x_min"]), lo, rtol=1e-6)
        np.testing.assert_allclose(float(ranges[site]["x_max"]), hi, rtol=1e-6)
    # Padding is excluded: with all tokens included the range of the scores differs.
    all_tokens = flatten_points(calibrate(model, params, batches, config, sequential=False,
                                          exclude_padding=False))
    site = "decoder/layers_0/attention/scores"
    assert float(all_tokens[site]["x_max"]) != float(ranges[site]["x_max"])


def test_sequential_calibration_quantizes_earlier_points(opt):
    """One batch, current min-max: each point's range is the min / max of its input in the
    quantized forward pass that uses exactly those ranges (reference semantics)."""
    cfg, model, params = opt
    batch = make_batch(cfg, 5, pad=False)
    config = QuantConfig(act_estimator="current_minmax", num_calibration_batches=1)
    qranges = calibrate(model, params, [batch], config, sequential=True)

    @jax.jit
    def quantized_inputs(params, qranges, batch):
        seen = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, QuantPoint) and context.method_name == "__call__":
                seen["/".join(context.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record), quant_context(QuantContext(bits=8)):
            model.apply({"params": params, "qranges": qranges}, batch["input_ids"],
                        batch["attention_mask"])
        return seen

    seen = jax.device_get(quantized_inputs(params, qranges, batch))
    flat = flatten_points(qranges)
    assert set(seen) == set(flat)
    for site, r in flat.items():
        np.testing.assert_allclose([r["x_min"], r["x_max"]],
                                   [seen[site].min(), seen[site].max()], rtol=1e-6, err_msg=site)
    stats_only = flatten_points(calibrate(model, params, [batch], config, sequential=False))
    site = "decoder/layers_0/mlp/output_output"
    assert float(stats_only[site]["x_max"]) != float(flat[site]["x_max"])
    assert float(stats_only["embeddings_sum"]["x_max"]) == float(flat["embeddings_sum"]["x_max"])


def test_errors(opt):
    cfg, model, params = opt
    with pytest.raises(ValueError, match="zero batches"):
        calibrate(model, params, [], QuantConfig())
    with pytest.raises(ValueError, match="per_token"):
        calibrate(model, params, [make_batch(cfg, 0)], QuantConfig(act_granularity="per_token"))
    bad = jax.tree_util.tree_map(lambda x: x, params)
    kernel = np.array(bad["decoder"]["layers_0"]["mlp"]["output"]["kernel"])
    kernel[0, 0] = np.nan
    bad["decoder"]["layers_0"]["mlp"]["output"]["kernel"] = kernel
    batches = [make_batch(cfg, 0, pad=False), make_batch(cfg, 1, pad=False)]
    with pytest.raises(ValueError, match=r"batch 0 .*'decoder/layers_0/mlp/output_output'"):
        calibrate(model, bad, batches, QuantConfig(num_calibration_batches=2))


@pytest.mark.parametrize("name", ["current_minmax", "running_minmax", "percentile", "mse"])
def test_observer_matches_host_estimator(name):
    obs = EstimatorObserver(name=name, num_candidates=20, percentile=99.0)
    est = obs.estimator()
    xs = [jax.random.normal(jax.random.PRNGKey(i), (3, 5, 7)) * (1 + i) for i in range(3)]
    state = est.init()
    for i, x in enumerate(xs):
        dev_state = {k: jnp.asarray(v) for k, v in obs.state_arrays(state).items()}
        stats = obs.stats(x, None, dev_state)
        if name != "mse" or i == 0:  # unmasked statistics are estimators.batch_stats
            ref = batch_stats(x, name, percentile=99.0, num_candidates=20)
            for k in ref:
                np.testing.assert_allclose(stats[k], ref[k], rtol=1e-6)
        folded = obs.fold(dev_state, stats)
        state = est.update(state, jax.device_get(stats))
        np.testing.assert_allclose(folded, est.finalize(state), rtol=1e-5)
    # Masked statistics use only the real entries.
    where = np.zeros((3, 5, 7), bool)
    where[:, :3] = True
    x = np.asarray(xs[2])
    stats = obs.stats(jnp.asarray(x), jnp.asarray(where), None)
    ref = batch_stats(jnp.asarray(x[where]), name, percentile=99.0, num_candidates=20)
    for k in ref:
        np.testing.assert_allclose(stats[k], ref[k], rtol=1e-5)


def test_tail_percentiles_equal_numpy_float64():
    x = np.random.default_rng(0).standard_t(3, 50_003).astype(np.float32)
    where = np.random.default_rng(1).random(x.size) < 0.7
    for p in (99.9, 99.999):
        got = tail_percentiles(jnp.asarray(x), jnp.asarray(where), p)
        ref = np.percentile(x[where].astype(np.float64), [100 - p, p])
        np.testing.assert_allclose([got["low"], got["high"]], ref, rtol=2e-7)
