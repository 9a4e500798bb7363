"""PTQ options that follow the authors' code, each checked against a NumPy version of the
reference's rule (qualcomm-ai-research/outlier-free-transformers, quantization/): the unsigned
grid, the MSE candidate grid, BERT's two-step embedding quantization, a full-precision head,
quantized logits; and, on tiny BERT / OPT, that each option alone moves the quantized loss."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers import build_model, get_model_config
from qtransformers.nn.quant_point import (EMBEDDINGS_WORD_TYPE, FP_HEAD_TABLE, LOGITS,
                                          QuantContext, QuantPoint, quant_context)
from qtransformers.ops import quant as quant_ops
from qtransformers.quant import (QuantConfig, calibrate, calibration_batches_fn, evaluate_ptq,
                                 flatten_points, make_quantized_eval_fn,
                                 optional_points, quantize_params, summarize)
from qtransformers.quant.params import quantize_weight

T = 16


# ----- NumPy versions of the reference's rules (float32 as its torch code) -----

def ref_weight_quant(w, x_min, x_max, bits):
    """SymmetricUniformQuantizer.set_quant_range(x_min, x_max) then forward: unsigned grid
    [0, 2^b - 1] when x_min >= 0, else signed [-2^(b-1), 2^(b-1) - 1]; step absmax / int_max."""
    x_min, x_max = np.float32(min(x_min, 0.0)), np.float32(max(x_max, 1e-8))
    signed = bool(x_min < 0)
    int_max = np.float32(2 ** (bits - signed) - 1)
    int_min = -(2 ** (bits - 1)) if signed else 0
    delta = np.float32(max(abs(x_min), x_max)) / int_max
    return (delta * np.clip(np.round(w / delta), int_min, int_max)).astype(np.float32)


def ref_mse_weight_quant(w, bits, num_candidates=100, range_margin=0.5):
    """MSE_Estimator(opt_method=grid) on a symmetric quantizer: one-sided when min(w) >= 0;
    candidates i * (max|w| + margin) / N, i = 1..N; summed squared error; first argmin."""
    one_sided = bool(w.min() >= 0)
    step = (max(abs(float(w.min())), float(w.max())) + range_margin) / num_candidates
    losses = [np.inf]
    for i in range(1, num_candidates + 1):
        neg, pos = (0.0 if one_sided else -step * i), step * i
        y = ref_weight_quant(w, np.float32(neg), np.float32(pos), bits)
        losses.append(np.sum((w - y) ** 2, dtype=np.float32))
    best = int(np.argmin(losses))
    x_min = 0.0 if one_sided else -step * best
    return ref_weight_quant(w, np.float32(x_min), np.float32(step * best), bits)


def ref_act_quant(x, x_min, x_max, bits=8):
    """AsymmetricUniformQuantizer: range widened to 0, zero point rounded."""
    x_min, x_max = np.float32(min(x_min, 0.0)), np.float32(max(x_max, 0.0))
    scale = (x_max - x_min) / np.float32(2 ** bits - 1)
    zero = np.round(-x_min / scale)
    return scale * (np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1) - zero)


def ln_like_scales(seed, n=64):
    """All-positive LayerNorm scales as after training, one larger than the rest."""
    w = np.random.default_rng(seed).uniform(0.3, 1.7, n).astype(np.float32)
    w[3] = 2.5
    return w


# ----- unsigned grid and the MSE candidate grid -----

@pytest.mark.parametrize("bits", [8, 4])
def test_unsigned_grid_for_non_negative_weights(bits):
    w = ln_like_scales(0)
    got = np.asarray(quantize_weight(jnp.asarray(w), "ln/scale",
                                     QuantConfig(weight_bits=bits, unsigned_weights=True)))
    np.testing.assert_array_equal(got, ref_weight_quant(w, w.min(), w.max(), bits))
    steps = np.unique(np.round(got / (2.5 / (2 ** bits - 1)), 4))
    np.testing.assert_array_equal(steps, np.round(steps))  # on the grid of step max/(2^b - 1)
    signed = np.asarray(quantize_weight(jnp.asarray(w), "ln/scale", QuantConfig(weight_bits=bits)))
    assert np.sum((signed - w) ** 2) > 2 * np.sum((got - w) ** 2)  # half the step: less error
    # One negative entry: the reference stays signed, and so do we.
    w_neg = w.copy()
    w_neg[0] = -0.01
    got_neg = quantize_weight(jnp.asarray(w_neg), "ln/scale",
                              QuantConfig(weight_bits=bits, unsigned_weights=True))
    np.testing.assert_array_equal(np.asarray(got_neg),
                                  ref_weight_quant(w_neg, w_neg.min(), w_neg.max(), bits))


def test_mse_candidate_grid_spans_max_plus_margin():
    cmin, cmax = quant_ops.candidate_ranges(-0.25, 0.9, 100, True, margin=0.5)
    np.testing.assert_allclose([cmax[0], cmax[-1], cmin[-1]], [0.014, 1.4, -1.4], rtol=1e-6)
    cmin, cmax = quant_ops.candidate_ranges(-0.25, 0.9, 100, True)
    np.testing.assert_allclose([cmax[0], cmax[-1]], [0.009, 0.9], rtol=1e-6)


def test_mse_weight_search_matches_reference():
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 0.05, (32, 48)).astype(np.float32)
    kernel[5, 7] = 0.9  # an outlier the search should clip
    config = QuantConfig(weight_estimator="mse", weight_mse_margin=0.5, unsigned_weights=True)
    # A signed kernel at 4 bits, all-positive scales (the one-sided search) at 8 bits.
    for path, w, bits in (("dense/kernel", kernel, 4), ("ln/scale", ln_like_scales(2), 8)):
        got = np.asarray(quantize_weight(jnp.asarray(w), path, config.replace(weight_bits=bits)))
        np.testing.assert_allclose(got, ref_mse_weight_quant(w, bits), rtol=1e-6, atol=1e-8,
                                   err_msg=path)
    # Without the margin the grid (and so the chosen range) differs.
    no_margin = quantize_weight(jnp.asarray(kernel), "dense/kernel",
                                config.replace(weight_bits=4, weight_mse_margin=0.0))
    assert not np.array_equal(np.asarray(no_margin), ref_mse_weight_quant(kernel, 4))


# ----- tiny models -----

def _batch(cfg, seed, family):
    r = np.random.default_rng(seed)
    ids = r.integers(3, cfg.vocab_size, (4, T)).astype(np.int32)
    ids[:, ::4] = 2
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if family == "bert":
        batch["token_type_ids"] = (np.arange(T)[None] >= T // 2).astype(np.int32).repeat(4, 0)
        batch["targets"] = ids.copy()
        batch["weights"] = (r.random(ids.shape) < 0.3).astype(np.float32)
    else:
        batch["targets"] = np.roll(ids, -1, axis=1)
        batch["weights"] = np.ones(ids.shape, np.float32)
        batch["weights"][:, -1] = 0
    return batch


def _init(family):
    """A 1-layer tiny model whose LayerNorm scales / biases look trained, one outlier channel."""
    cfg = get_model_config(f"{family}_tiny", num_layers=1)
    model = build_model(cfg)
    b = _batch(cfg, 0, family)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), b["input_ids"],
                                               b["attention_mask"])["params"])
    rng = np.random.default_rng(3)

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        leaf = np.array(leaf)
        if name.endswith("['scale']"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        if name.endswith("['bias']"):
            return rng.normal(0, 0.05, leaf.shape).astype(leaf.dtype)
        return leaf

    params = jax.tree_util.tree_map_with_path(perturb, params)
    table = params["word_embeddings" if family == "bert" else "embed_tokens"]["embedding"]
    table[:, 5] *= 8.0  # an outlier channel
    return cfg, model, params


@pytest.fixture(scope="module")
def bert():
    return _init("bert")


@pytest.fixture(scope="module")
def opt():
    return _init("opt")


def _apply_recording(model, variables, batch, config):
    """(logits, {point path: (input, output), 'head_input': the head's input}) of one apply."""
    logits, seen = _apply_recording_jit(model, config.act_bits, optional_points(config),
                                        variables, batch)
    return np.asarray(logits), jax.device_get(seen)


@jax.jit(static_argnums=(0, 1, 2))
def _apply_recording_jit(model, bits, optional, variables, batch):
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and isinstance(context.module, QuantPoint):
            seen[path] = (args[0], out)
        if context.method_name == "__call__" and path in ("mlm_head/transform_ln", "final_ln"):
            seen["head_input"] = out
        return out

    ctx = QuantContext(bits=bits, optional_points=optional)
    args = [batch["input_ids"], batch["attention_mask"]]
    if "token_type_ids" in batch:
        args.append(batch["token_type_ids"])
    with nn.intercept_methods(record), quant_context(ctx):
        logits = model.apply(variables, *args)
    return logits, seen


def test_bert_two_step_embedding_quantization(bert):
    cfg, model, params = bert
    calib = [_batch(cfg, s, "bert") for s in (1, 2)]
    config = QuantConfig(embedding_layout="two_step", num_calibration_batches=2)
    qparams = quantize_params(params, config)
    qranges = calibrate(model, qparams, calib, config)
    ranges = flatten_points(qranges)
    assert EMBEDDINGS_WORD_TYPE in ranges
    batch = _batch(cfg, 7, "bert")
    variables = {"params": qparams, "qranges": qranges}
    _, seen = _apply_recording(model, variables, batch, config)
    word = np.asarray(qparams["word_embeddings"]["embedding"])
    token_type = np.asarray(qparams["token_type_embeddings"]["embedding"])
    position = np.asarray(qparams["position_embeddings"]["embedding"])
    first = word[batch["input_ids"]] + token_type[batch["token_type_ids"]]
    r1, r2 = ranges[EMBEDDINGS_WORD_TYPE], ranges["embeddings_sum"]
    expected = ref_act_quant(ref_act_quant(first, r1["x_min"], r1["x_max"]) + position[:T],
                             r2["x_min"], r2["x_max"])
    np.testing.assert_allclose(seen["embeddings_sum"][1], expected, rtol=1e-6, atol=1e-6)
    # The default layout has no first point and quantizes word + position + token type once.
    config1 = config.replace(embedding_layout="sum")
    ranges1 = calibrate(model, qparams, calib, config1)
    assert EMBEDDINGS_WORD_TYPE not in flatten_points(ranges1)
    _, seen1 = _apply_recording(model, {"params": qparams, "qranges": ranges1}, batch, config1)
    assert EMBEDDINGS_WORD_TYPE not in seen1
    r = flatten_points(ranges1)["embeddings_sum"]
    np.testing.assert_allclose(seen1["embeddings_sum"][1],
                               ref_act_quant(first + position[:T], r["x_min"], r["x_max"]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_head_left_in_full_precision(family, bert, opt):
    cfg, model, params = bert if family == "bert" else opt
    table_path = "word_embeddings" if family == "bert" else "embed_tokens"
    fp_table = np.asarray(params[table_path]["embedding"])
    batch = _batch(cfg, 7, family)
    bias = np.asarray(params["mlm_head"]["bias"]) if family == "bert" else 0.0
    for head, table_of in (("fp", lambda q: fp_table),
                           ("follow_embedding", lambda q: np.asarray(q[table_path]["embedding"]))):
        config = QuantConfig(head=head)
        qparams = quantize_params(params, config)
        assert (FP_HEAD_TABLE in qparams) == (head == "fp")
        if head == "fp":
            np.testing.assert_array_equal(np.asarray(qparams[FP_HEAD_TABLE]), fp_table)
        assert not np.array_equal(np.asarray(qparams[table_path]["embedding"]), fp_table)
        logits, seen = _apply_recording(model, {"params": qparams}, batch, config)
        h = np.asarray(seen["head_input"], np.float64)
        np.testing.assert_allclose(logits, h @ table_of(qparams).T.astype(np.float64) + bias,
                                   rtol=1e-4, atol=1e-5, err_msg=head)


def test_logits_quantized_with_head_weights(opt):
    cfg, model, params = opt
    calib = [_batch(cfg, s, "opt") for s in (1, 2)]
    config = QuantConfig(head="quantized", num_calibration_batches=2)
    qparams = quantize_params(params, config)
    assert FP_HEAD_TABLE not in qparams
    qranges = calibrate(model, qparams, calib, config)
    r = flatten_points(qranges)[LOGITS]
    logits, seen = _apply_recording(model, {"params": qparams, "qranges": qranges},
                                    _batch(cfg, 7, "opt"), config)
    table = np.asarray(qparams["embed_tokens"]["embedding"])  # the quantized tied table
    raw = seen["head_input"] @ table.T
    np.testing.assert_allclose(seen[LOGITS][0], raw, rtol=1e-5, atol=1e-5)
    expected = ref_act_quant(seen[LOGITS][0], r["x_min"], r["x_max"])
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    assert len(np.unique(logits)) <= 256


# ----- each option alone moves the quantized loss -----

_EVAL_FNS = {}


def _ptq_loss(model, params, evals, pool, config):
    qparams = quantize_params(params, config)
    qranges = calibrate(model, qparams, calibration_batches_fn(pool, config)(0), config)
    key = (model, optional_points(config))  # one compiled eval per set of active points
    if key not in _EVAL_FNS:
        _EVAL_FNS[key] = make_quantized_eval_fn(model, None, config, validate=False)
    sums = [jax.device_get(_EVAL_FNS[key](qparams, qranges, b)) for b in evals]
    total = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
    return summarize("mlm" if model.config.family == "bert" else "clm", total)["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "opt"])
def test_each_option_alone_changes_the_quantized_loss(family, bert, opt):
    """Each option flipped alone from the defaults moves the W8A8 loss (the MSE margin from
    MSE weights). The reference presets set all of them (test_quant_config)."""
    cfg, model, params = bert if family == "bert" else opt
    pool = [_batch(cfg, s, family) for s in range(1, 5)]  # random order draws [2, 3] at seed 0
    evals = [_batch(cfg, 9, family)]
    base = QuantConfig(num_calibration_batches=2)
    flips = [("head", "fp"), ("unsigned_weights", True), ("calibration_order", "first")]
    flips.append(("embedding_layout", "two_step") if family == "bert" else ("head", "quantized"))
    base_loss = _ptq_loss(model, params, evals, pool, base)
    for field, value in flips:
        loss = _ptq_loss(model, params, evals, pool, base.replace(**{field: value}))
        assert abs(loss - base_loss) > 1e-6 * base_loss, (field, loss, base_loss)
    mse = base.replace(weight_estimator="mse")
    assert abs(_ptq_loss(model, params, evals, pool, mse.replace(weight_mse_margin=0.5))
               - _ptq_loss(model, params, evals, pool, mse)) > 1e-6 * base_loss


def test_calibration_order_and_unused_batches_warning(opt):
    cfg, model, params = opt
    pool = [_batch(cfg, s, "opt") for s in range(1, 5)]
    first = calibration_batches_fn(pool, QuantConfig(num_calibration_batches=2,
                                                     calibration_order="first"))
    assert [b is p for b, p in zip(first(5), pool[:2])] == [True, True]
    rand = calibration_batches_fn(pool, QuantConfig(num_calibration_batches=2))
    assert [next(i for i, p in enumerate(pool) if p is b) for b in rand(0)] == [2, 3]
    with pytest.warns(UserWarning, match="got 4 batches but uses only the first 2"):
        calibrate(model, params, pool, QuantConfig(num_calibration_batches=2))


def test_weights_only_and_activations_only_evaluation(opt):
    cfg, model, params = opt
    pool = [_batch(cfg, s, "opt") for s in range(1, 3)]
    evals = [_batch(cfg, 9, "opt")]
    config = QuantConfig(head="fp", num_calibration_batches=2, seeds=(0,))
    out = {q: evaluate_ptq(model, params, evals, pool, config, quantize=q)
           for q in ("both", "weights", "activations")}
    assert out["weights"]["qranges"] == {}
    fn = make_quantized_eval_fn(model, None, config)
    qparams = quantize_params(params, config)
    both = out["both"]["quantized"]["per_seed"][0]["loss"]
    ranges = out["both"]["qranges"][0]
    assert both == pytest.approx(summarize("clm", jax.device_get(
        fn(qparams, ranges, evals[0])))["loss"], rel=1e-6)
    weights_only = out["weights"]["quantized"]["per_seed"][0]["loss"]
    acts_only = out["activations"]["quantized"]["per_seed"][0]["loss"]
    fp = out["both"]["fp"]["loss"]
    assert len({fp, weights_only, acts_only, both}) == 4
    acts_ranges = calibrate(model, params, pool, config)
    assert acts_only == pytest.approx(summarize("clm", jax.device_get(
        fn(params, acts_ranges, evals[0])))["loss"], rel=1e-6)
