"""QuantConfig validation, presets, overrides and the parameter include / exclude rule."""
import dataclasses

import pytest

from qtransformers.quant import config as qconfig
from qtransformers.quant.config import QuantConfig, get_preset, param_is_quantized


def test_defaults_follow_the_paper():
    c = QuantConfig()
    assert (c.weight_bits, c.act_bits) == (8, 8)
    assert (c.weight_estimator, c.act_estimator) == ("minmax", "running_minmax")
    assert c.act_percentile == 99.999 and c.act_momentum == 0.9
    assert (c.num_calibration_batches, c.seeds) == (16, (0, 1, 2))
    assert not c.quantize_head


def test_presets():
    # The paper presets keep the head in full precision (paper.md §4), else the defaults.
    assert get_preset("w8a8_bert") == QuantConfig(head="fp")
    assert get_preset("w8a8_vit") == get_preset("w8a8_bert")
    opt = get_preset("w8a8_opt")
    assert opt.weight_estimator == "mse" and opt.act_estimator == "percentile"
    assert opt.act_percentile == 99.999
    table = {
        "w6a8": (6, 8, "running_minmax"),
        "w4a8": (4, 8, "running_minmax"),
        "w6a6": (6, 6, "mse"),
        "w4a4": (4, 4, "mse"),
    }
    for name, (wb, ab, act_est) in table.items():
        c = get_preset(name)
        assert (c.weight_bits, c.act_bits, c.act_estimator) == (wb, ab, act_est)
        assert c.weight_estimator == "mse"
    with pytest.raises(ValueError, match="w8a8_bert"):
        get_preset("w8a8")
    assert set(qconfig.PRESET_DOCS) == set(qconfig.PRESETS)


def test_reference_presets_switch_every_reference_behaviour():
    """The reference presets turn on every behaviour of the authors' code; paper presets none
    but the full-precision head (which the paper states)."""
    base = QuantConfig()
    bert, opt = get_preset("w8a8_bert_reference"), get_preset("w8a8_opt_reference")
    for ref in (bert, opt):
        assert ref.head == "fp" and ref.unsigned_weights and ref.weight_mse_margin == 0.5
    assert bert.embedding_layout == "two_step" and bert.calibration_order == "first"
    assert (bert.weight_estimator, bert.act_estimator) == ("minmax", "running_minmax")
    assert (bert.num_calibration_batches, bert.calibration_batch_size) == (16, 32)
    assert (opt.weight_estimator, opt.act_estimator, opt.act_percentile) == (
        "mse", "percentile", 99.999)
    assert (opt.num_calibration_batches, opt.calibration_batch_size) == (4, 8)
    assert opt.embedding_layout == "sum"  # OPT has one embedding sum in the reference too
    assert get_preset("w8a8_opt_reference_all") == opt.replace(head="quantized")
    assert qconfig.optional_points(bert) == ("embeddings_word_type",)
    assert qconfig.optional_points(get_preset("w8a8_opt_reference_all")) == ("logits",)
    for name in ("w8a8_bert", "w8a8_opt", "w6a8", "w4a8", "w6a6", "w4a4"):
        paper = get_preset(name)
        assert paper.head == "fp"
        assert (paper.unsigned_weights, paper.embedding_layout, paper.weight_mse_margin,
                paper.calibration_order) == (base.unsigned_weights, "sum", 0.0, "random")


def test_from_dict_and_replace():
    c = QuantConfig.from_dict({"weight_bits": 6, "seeds": [3, 4], "include": [r"kernel$"]})
    assert c.weight_bits == 6 and c.seeds == (3, 4) and c.include == (r"kernel$",)
    assert QuantConfig.from_dict(c.to_dict()) == c
    d = c.replace(act_estimator="percentile", act_percentile=99.99)
    assert d.act_estimator == "percentile" and d.weight_bits == 6
    assert c.act_estimator == "running_minmax"  # the original is unchanged
    with pytest.raises(ValueError, match="unknown.*wbits"):
        QuantConfig.from_dict({"wbits": 4})
    with pytest.raises(ValueError, match="act_bits"):
        c.replace(act_bits=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weight_bits = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("weight_bits", 1, r"weight_bits must be in 2\.\.16, got 1"),
        ("weight_bits", 17, "weight_bits"),
        ("act_bits", 8.0, "act_bits"),
        ("weight_estimator", "percentile", "weight_estimator must be one of"),
        ("act_estimator", "max", "act_estimator must be one of"),
        ("act_percentile", 50, r"act_percentile must be a number in \(50, 100\], got 50"),
        ("act_percentile", 100.01, "act_percentile"),
        ("weight_granularity", "per_token", "weight_granularity"),
        ("act_granularity", "per_channel", "act_granularity"),
        ("include", (r"kernel(",), "invalid regex"),
        ("num_calibration_batches", 0, "num_calibration_batches"),
        ("seeds", (), "seeds"),
        ("head", "tied", "head must be one of"),
        ("unsigned_weights", 1, "unsigned_weights"),
        ("embedding_layout", "bert", "embedding_layout must be one of"),
        ("weight_mse_margin", -0.5, "weight_mse_margin"),
        ("calibration_order", "sorted", "calibration_order must be one of"),
    ],
)
def test_validation_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**{field: value})


def test_percentile_upper_end_allowed():
    assert QuantConfig(act_percentile=100).act_percentile == 100


@pytest.mark.parametrize(
    "path, quantized",
    [
        ("encoder/layers_0/attention/query/kernel", True),
        ("encoder/layers_0/attention/query/bias", False),
        ("encoder/layers_0/ffn/output/kernel", True),
        ("embeddings/word_embeddings/embedding", True),
        ("encoder/layers_0/attention_norm/scale", True),
        ("encoder/layers_0/attention_norm/bias", False),
        ("encoder/layers_0/attention/gate/kernel", False),
        ("decoder/layers_3/self_attn/gate_proj/kernel", False),
        ("mlm_head/dense/kernel", False),
        ("mlm_head/layer_norm/scale", False),
        ("lm_head/kernel", False),
        ("classifier/kernel", False),
        ("encoder/layers_0/attention/query/kernel_extra", False),
        ("decoder/my_lm_head_like/kernel", True),  # only whole path elements name the head
    ],
)
def test_param_is_quantized_default(path, quantized):
    assert param_is_quantized(path, QuantConfig()) is quantized


def test_quantize_head_and_custom_patterns():
    c = QuantConfig(quantize_head=True)
    assert param_is_quantized("lm_head/kernel", c)
    assert param_is_quantized("mlm_head/transform/kernel", QuantConfig(head="quantized"))
    assert not param_is_quantized("mlm_head/transform/kernel", QuantConfig(head="fp"))
    with pytest.raises(ValueError, match="contradicts head='fp'"):
        QuantConfig(head="fp", quantize_head=True)
    assert not param_is_quantized("lm_head/bias", c)  # biases stay excluded
    c = QuantConfig(exclude=qconfig.DEFAULT_EXCLUDE + (r"(^|/)embedding$",))
    assert not param_is_quantized("embeddings/word_embeddings/embedding", c)
    assert param_is_quantized("encoder/layers_0/attention/query/kernel", c)
