"""quantization_sensitivity: loss changes against a NumPy cross entropy of hand-quantized logits."""
import jax
import numpy as np
import pytest

from qtransformers.nn.quant_point import QuantContext, quant_context
from qtransformers.quant import (QuantConfig, calibrate, flatten_points, group_of,
                                 quantization_sensitivity, quantize_params, sensitivity_rows,
                                 unflatten_points)

from test_ptq_eval import DELIM, init_opt_tiny, make_batch  # the same model and CLM batches


@pytest.fixture(scope="module")
def setup():
    cfg, model, params = init_opt_tiny(num_layers=2)
    planted = jax.tree_util.tree_map(np.array, params)
    planted["embed_tokens"]["embedding"][DELIM, [5, 17]] = 20.0  # ~3000x the init scale
    evals = [make_batch(cfg, 10), make_batch(cfg, 11)]
    calib = [make_batch(cfg, 20), make_batch(cfg, 21)]
    return cfg, model, params, planted, evals, calib


def numpy_loss(model, params, qranges, batches):
    """Mean weighted next-token cross entropy (float64) of the model with `qranges` applied."""
    variables = {"params": params, **({"qranges": qranges} if qranges else {})}

    @jax.jit
    def logits_of(v, b):
        with quant_context(QuantContext()):
            return model.apply(v, b["input_ids"], b["attention_mask"])

    nll = count = 0.0
    for b in batches:
        z = np.asarray(logits_of(variables, b), np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= (np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["weights"]).sum()
        count += b["weights"].sum()
    return nll / count


def test_matches_hand_quantized_models(setup):
    _, model, params, planted, evals, calib = setup
    config = QuantConfig(num_calibration_batches=2)
    report = quantization_sensitivity(model, planted, evals, calib, config, group_by="point")
    fp = numpy_loss(model, planted, None, evals)
    np.testing.assert_allclose(report["fp_loss"], fp, rtol=1e-5)
    weights_only = numpy_loss(model, quantize_params(planted, config), None, evals) - fp
    np.testing.assert_allclose(report["weights_only"]["loss_change"], weights_only, atol=2e-5)
    ranges = flatten_points(calibrate(model, planted, calib, config))  # FP weights
    assert report["activations_only"]["num_points"] == len(ranges)
    acts_only = numpy_loss(model, planted, unflatten_points(ranges), evals) - fp
    np.testing.assert_allclose(report["activations_only"]["loss_change"], acts_only, atol=2e-5)
    assert list(report["groups"]) == list(ranges)
    for path in ("embeddings_sum", "decoder/layers_1/mlp_residual",
                 "decoder/layers_0/attention/probs"):
        g = report["groups"][path]
        alone = numpy_loss(model, planted, unflatten_points({path: ranges[path]}), evals) - fp
        np.testing.assert_allclose(g["loss_change"], alone, atol=2e-5)
        width = float(ranges[path]["x_max"] - ranges[path]["x_min"])
        np.testing.assert_allclose(g["max_range"], width, rtol=1e-6)
    assert report["groups"]["decoder/layers_0/attention/probs"]["max_range"] <= 1.0


def test_planted_outlier_dominates_its_group(setup):
    _, model, params, planted, evals, calib = setup
    config = QuantConfig(num_calibration_batches=2, act_bits=6)
    clean = quantization_sensitivity(model, params, evals, calib, config)
    dirty = quantization_sensitivity(model, planted, evals, calib, config)
    # The planted embedding values (20.0) set the residual stream's range; the softmax sites do
    # not see them. Measured (random init, so signs vary): |change| of embeddings_sum 0.00016
    # clean -> 8.5 nats planted; probs 0.003 planted.
    assert dirty["groups"]["embeddings_sum"]["max_range"] >= 20.0
    assert clean["groups"]["embeddings_sum"]["max_range"] < 1.0
    hit = abs(dirty["groups"]["embeddings_sum"]["loss_change"])
    assert hit > 0.5 and hit > 100 * abs(clean["groups"]["embeddings_sum"]["loss_change"])
    assert hit > 100 * abs(dirty["groups"]["probs"]["loss_change"])
    assert dirty["groups"]["probs"]["num_points"] == 2  # one per layer
    rows = sensitivity_rows(dirty)
    assert [r["quantized"] for r in rows[:2]] == ["weights only", "activations only"]
    assert len(rows) == 2 + len(dirty["groups"])


def test_groupings_partition_the_points(setup):
    _, model, params, _, evals, calib = setup
    config = QuantConfig(num_calibration_batches=1)
    paths = list(flatten_points(calibrate(model, params, calib[:1], config)))
    for group_by in ("kind", "layer", "point"):
        groups = {}
        for p in paths:
            groups.setdefault(group_of(p, group_by), []).append(p)
        assert sorted(x for ps in groups.values() for x in ps) == sorted(paths)
    assert set(groups_of := {group_of(p, "layer") for p in paths}) == {"layers_0", "layers_1",
                                                                        "other"}, groups_of
    assert group_of("decoder/layers_12/attention/probs", "kind") == "probs"
    assert group_of("decoder/layers_12/attention/probs", "layer") == "layers_12"
    with pytest.raises(ValueError, match="group_by must be one of"):
        quantization_sensitivity(model, params, evals, calib, config, group_by="site")
    with pytest.raises(ValueError, match="per-tensor activation ranges"):
        quantization_sensitivity(model, params, evals, calib,
                                 config.replace(act_granularity="per_token"))
