"""Quantized evaluation: planted outliers, one trace, sharding, qranges validation, PTQ seeds."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from qtransformers import build_model, get_model_config
from qtransformers.quant import (QuantConfig, calibrate, evaluate_ptq, flatten_points,
                                 make_eval_fn, make_quantized_eval_fn, quantize_params,
                                 random_subset_fn, unflatten_points)
from qtransformers.quant.evaluate import summarize

B, T, DELIM = 8, 16, 2


def make_batch(cfg, seed, rows=B):
    r = np.random.default_rng(seed)
    ids = r.integers(3, cfg.vocab_size, (rows, T)).astype(np.int32)
    ids[:, ::4] = DELIM  # a frequent delimiter token (where the planted outliers live)
    weights = np.ones((rows, T), np.float32)
    weights[:, -1] = 0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "targets": np.roll(ids, -1, axis=1), "weights": weights}


def init_opt_tiny(num_layers):
    """(cfg, model, params) of a tiny OPT initialised on make_batch's shapes."""
    cfg = get_model_config("opt_tiny", num_layers=num_layers)
    model = build_model(cfg)
    b = make_batch(cfg, 0)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), b["input_ids"],
                                               b["attention_mask"])["params"])
    return cfg, model, params


@pytest.fixture(scope="module")
def opt():
    return init_opt_tiny(num_layers=1)


@pytest.fixture(scope="module")
def logits_fn(opt):
    cfg, model, _ = opt
    from qtransformers.nn.quant_point import QuantContext, quant_context

    @jax.jit(static_argnums=3)
    def fn(params, qranges, batch, granularity):
        variables = {"params": params, **({"qranges": qranges} if qranges else {})}
        with quant_context(QuantContext(granularity=granularity)):
            return model.apply(variables, batch["input_ids"], batch["attention_mask"])
    return fn


def rel_error(a, b):
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_planted_outliers(opt, logits_fn):
    cfg, model, params = opt
    batch = make_batch(cfg, 0)
    calib = [make_batch(cfg, 1), make_batch(cfg, 2)]
    config = QuantConfig(num_calibration_batches=2)
    planted = jax.tree_util.tree_map(np.array, params)
    planted["embed_tokens"]["embedding"][DELIM, [5, 17]] = 20.0  # ~3000x the init scale
    errors = {}
    for name, p in (("clean", params), ("planted", planted)):
        fp = logits_fn(p, None, batch, "per_tensor")
        qr = calibrate(model, p, calib, config)
        errors[name, "a_tensor"] = rel_error(logits_fn(p, qr, batch, "per_tensor"), fp)
        errors[name, "a_token"] = rel_error(logits_fn(p, None, batch, "per_token"), fp)
        w8a8 = logits_fn(quantize_params(p, config), qr, batch, "per_tensor")
        errors[name, "w8a8"] = rel_error(w8a8, fp)
    # Measured: clean 0.021 (per tensor) / 0.011 (per token) / 0.025 (W8A8); planted 0.20 / 0.003.
    assert errors["clean", "w8a8"] < 0.05
    assert errors["planted", "a_tensor"] > 0.15
    assert errors["planted", "a_tensor"] > 5 * errors["clean", "a_tensor"]
    assert errors["planted", "a_token"] < 0.01
    assert errors["planted", "a_tensor"] > 20 * errors["planted", "a_token"]
    # Weight outliers: one fc1 column x100; per-channel ranges keep the other columns.
    wp = jax.tree_util.tree_map(np.array, params)
    wp["decoder"]["layers_0"]["mlp"]["intermediate"]["kernel"][:, 3] *= 100
    fp = logits_fn(wp, None, batch, "per_tensor")
    e_tensor = rel_error(logits_fn(quantize_params(wp, config), None, batch, "per_tensor"), fp)
    per_channel = config.replace(weight_granularity="per_channel")
    e_channel = rel_error(logits_fn(quantize_params(wp, per_channel), None, batch,
                                    "per_tensor"), fp)
    assert e_tensor > 0.1 and e_channel < 0.03 and e_tensor > 5 * e_channel


def test_eval_traces_once_and_validates(opt):
    cfg, model, params = opt
    config = QuantConfig(num_calibration_batches=1)
    qparams = quantize_params(params, config)
    b1, b2 = make_batch(cfg, 3), make_batch(cfg, 4)
    q_minmax = calibrate(model, qparams, [b1], config)
    q_mse = calibrate(model, qparams, [b1], config.replace(act_estimator="mse"))
    eval_fn = make_quantized_eval_fn(model, "clm", config, max_traces=1)
    results = [eval_fn(qparams, q, b) for q in (q_minmax, q_mse) for b in (b1, b2)]
    assert float(results[0]["loss_sum"]) != float(results[2]["loss_sum"])
    np.testing.assert_allclose(float(results[0]["weight_sum"]), B * (T - 1))
    flat = flatten_points(q_minmax)
    flat.pop("decoder/layers_0/attention/probs")
    flat["decoder/layers_0/bogus"] = {"x_min": 0.0, "x_max": 1.0}
    with pytest.raises(ValueError, match=r"missing \['decoder/layers_0/attention/probs'\]; "
                                         r"unexpected \['decoder/layers_0/bogus'\]"):
        eval_fn(qparams, unflatten_points(flat), b1)


def test_sharded_eval_matches_single_device(opt):
    cfg, model, params = opt
    config = QuantConfig(num_calibration_batches=1)
    batch = make_batch(cfg, 6)
    qranges = calibrate(model, params, [batch], config)
    eval_fn = make_quantized_eval_fn(model, "clm", config)
    single = jax.device_get(eval_fn(params, qranges, batch))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated = NamedSharding(mesh, P())
    out = eval_fn(jax.device_put(params, replicated), jax.device_put(qranges, replicated),
                  sharded_batch)
    assert len(sharded_batch["input_ids"].sharding.device_set) == 8
    for k in single:
        np.testing.assert_allclose(float(out[k]), float(single[k]), rtol=2e-5)


def test_evaluate_ptq(opt):
    cfg, model, params = opt
    evals = [make_batch(cfg, 10), make_batch(cfg, 11)]
    pool = [make_batch(cfg, 20 + i) for i in range(4)]
    config = QuantConfig(num_calibration_batches=2, seeds=(0, 1))
    out = evaluate_ptq(model, params, evals, random_subset_fn(pool, 2), config)
    # FP perplexity from a NumPy cross entropy.
    nll, count = 0.0, 0.0
    apply = jax.jit(model.apply)
    for b in evals:
        logits = np.asarray(apply({"params": params}, b["input_ids"], b["attention_mask"]),
                            np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                               keepdims=True)) - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        nll -= (picked * b["weights"]).sum()
        count += b["weights"].sum()
    np.testing.assert_allclose(out["fp"]["perplexity"], np.exp(nll / count), rtol=1e-4)
    values = [r["perplexity"] for r in out["quantized"]["per_seed"]]
    assert [r["seed"] for r in out["quantized"]["per_seed"]] == [0, 1]
    np.testing.assert_allclose(out["quantized"]["mean"], np.mean(values))
    np.testing.assert_allclose(out["quantized"]["std"], np.std(values))
    assert abs(out["quantized"]["mean"] / out["fp"]["perplexity"] - 1) < 0.01
    assert set(out["qranges"]) == {0, 1}
    fp_again = summarize("clm", jax.device_get(make_eval_fn(model)(params, evals[0])))
    assert fp_again["perplexity"] > 1
    dynamic = evaluate_ptq(model, params, evals[:1], random_subset_fn(pool, 2),
                           config.replace(act_granularity="per_token"))
    assert len(dynamic["quantized"]["per_seed"]) == 1 and dynamic["qranges"] == {}
