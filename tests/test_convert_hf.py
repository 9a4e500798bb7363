"""HF -> qtransformers weight conversion: logits match small random HF models (BERT, OPT pre-LN
and post-LN with projected embeddings, ViT), folder round trips and strict key checking."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qtransformers.convert import config_from_hf, load_hf, params_from_hf_state_dict  # noqa: E402
from qtransformers.models.registry import build_model  # noqa: E402

ATOL = 1e-4
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def _randomize(model: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """Random weights everywhere (N(0, 0.1); LayerNorm scales 1 + N(0, 0.1)), so that biases
    and LayerNorm parameters, zero / one at HF init, are tested too. Ties are kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            is_scale = "norm" in name.lower() and name.endswith("weight")
            param.copy_(noise + 1.0 if is_scale else noise)
    return model.eval()


def _bert():
    config = transformers.BertConfig(vocab_size=99, intermediate_size=37,
                                     max_position_embeddings=64, attn_implementation="eager",
                                     **SMALL)
    return _randomize(transformers.BertForMaskedLM(config), 0)


def _opt(pre_ln: bool):
    extra = {} if pre_ln else dict(word_embed_proj_dim=16)  # 350m-like: post-LN, projections
    config = transformers.OPTConfig(vocab_size=99, ffn_dim=37, max_position_embeddings=64,
                                    do_layer_norm_before=pre_ln, attn_implementation="eager",
                                    **SMALL, **extra)
    return _randomize(transformers.OPTForCausalLM(config), 1 if pre_ln else 2)


def _vit():
    config = transformers.ViTConfig(intermediate_size=37, image_size=16, patch_size=8,
                                    num_labels=5, attn_implementation="eager", **SMALL)
    return _randomize(transformers.ViTForImageClassification(config), 3)


@pytest.fixture(scope="module")
def hf_models():
    return {"bert": _bert(), "opt_pre": _opt(True), "opt_post": _opt(False), "vit": _vit()}


def _ids(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 99, (2, 10))


def _state_dict(model) -> dict:
    return dict(model.state_dict())


def test_config_from_hf_maps_fields(hf_models):
    bert = config_from_hf(hf_models["bert"].config)
    assert (bert.family, bert.d_model, bert.num_layers, bert.num_heads, bert.d_ff) == (
        "bert", 32, 2, 4, 37)
    assert (bert.activation, bert.pre_ln, bert.ln_eps, bert.max_len) == ("gelu", False, 1e-12, 64)
    assert bert.pad_token_id == 0 and bert.dropout_rate == 0.1
    pre, post = (config_from_hf(hf_models[k].config) for k in ("opt_pre", "opt_post"))
    assert (pre.activation, pre.pre_ln, pre.final_ln, pre.ln_eps) == ("relu", True, True, 1e-5)
    assert pre.word_embed_proj_dim is None and pre.attention_dropout_rate == 0.0
    assert (post.pre_ln, post.final_ln, post.word_embed_proj_dim) == (False, False, 16)
    vit = config_from_hf(hf_models["vit"].config)
    assert (vit.image_size, vit.patch_size, vit.num_classes, vit.max_len) == (16, 8, 5, 5)
    assert (vit.pre_ln, vit.final_ln, vit.activation) == (True, True, "gelu")
    assert config_from_hf(hf_models["bert"].config, softmax="clipped").softmax == "clipped"
    with pytest.raises(ValueError, match="qkv_bias"):
        config_from_hf(transformers.ViTConfig(qkv_bias=False))


def test_bert_logits_match_with_right_padding(hf_models):
    hf = hf_models["bert"]
    ids = _ids()
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    token_types = np.zeros_like(ids)
    token_types[:, 5:] = 1
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(token_types)).logits.numpy()
    config, params = load_hf(hf)
    out = build_model(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                    jnp.asarray(token_types))
    # BERT masks keys only, so even the padded rows agree: compare every position.
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["opt_pre", "opt_post"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_opt_logits_match_with_padding(hf_models, name, side):
    hf = hf_models[name]
    ids = _ids(1)
    mask = np.ones_like(ids)
    if side == "left":
        mask[1, :4] = 0
    else:
        mask[1, 7:] = 0
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    config, params = load_hf(hf)
    out = np.asarray(build_model(config).apply({"params": params}, jnp.asarray(ids),
                                               jnp.asarray(mask)))
    # Only real tokens are compared: a left-padded query sees no unmasked key at all, and HF's
    # additive mask turns such a row into a uniform average over all keys while ours does not;
    # those outputs are meaningless in both and never enter a loss.
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


def test_vit_logits_match(hf_models):
    hf = hf_models["vit"]
    images = np.random.RandomState(2).randn(2, 16, 16, 3).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(images).permute(0, 3, 1, 2)).logits.numpy()
    config, params = load_hf(hf)
    out = build_model(config).apply({"params": params}, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)


def _assert_same_params(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]))


@pytest.mark.parametrize("name", ["bert", "opt_post", "vit"])
def test_save_pretrained_folder_round_trip(hf_models, name, tmp_path):
    hf_models[name].save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    expected_config, expected_params = load_hf(hf_models[name])
    assert config == expected_config
    _assert_same_params(params, expected_params)


def test_key_spellings_without_prefix_and_legacy_vit_names(hf_models):
    # OPT checkpoints saved from OPTModel: no "model." prefix and no (tied) lm_head.
    opt_sd = {k.removeprefix("model."): v for k, v in _state_dict(hf_models["opt_pre"]).items()
              if k != "lm_head.weight"}
    config = config_from_hf(hf_models["opt_pre"].config)
    _assert_same_params(params_from_hf_state_dict(opt_sd, config),
                        load_hf(hf_models["opt_pre"])[1])
    # ViT files (hub checkpoints, and save_pretrained still) use the pre-5 names
    # encoder.layer.i.attention.attention.*, while transformers 5's state_dict() uses layers.i.*.
    legacy = {"attention.q_proj": "attention.attention.query",
              "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value",
              "attention.o_proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    vit_sd = {}
    for key, value in _state_dict(hf_models["vit"]).items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        vit_sd[key.replace("vit.layers.", "vit.encoder.layer.")] = value
    config = config_from_hf(hf_models["vit"].config)
    _assert_same_params(params_from_hf_state_dict(vit_sd, config), load_hf(hf_models["vit"])[1])


def test_boxed_params_match_init_structure(hf_models):
    config, params = load_hf(hf_models["bert"], boxed=True)
    abstract = jax.eval_shape(build_model(config).init, jax.random.key(0),
                              jnp.zeros((1, 2), jnp.int32))["params"]
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    assert (jax.tree.structure(params, is_leaf=is_box)
            == jax.tree.structure(dict(abstract), is_leaf=is_box))


def _bert_error(state_dict, **overrides) -> str:
    config = config_from_hf(transformers.BertConfig(vocab_size=99, intermediate_size=37,
                                                    max_position_embeddings=64, **SMALL),
                            **overrides)
    with pytest.raises(ValueError) as info:
        params_from_hf_state_dict(state_dict, config)
    return str(info.value)


def test_missing_unexpected_and_misshaped_keys_are_all_reported(hf_models):
    base = _state_dict(hf_models["bert"])
    missing = "bert.encoder.layer.1.attention.self.key.bias"
    wrong = "bert.encoder.layer.0.intermediate.dense.weight"

    sd = dict(base)
    del sd[missing]
    message = _bert_error(sd)
    assert "missing keys (1)" in message and missing in message

    sd = dict(base, **{"bert.encoder.layer.0.extra.weight": torch.zeros(3)})
    message = _bert_error(sd)
    assert "unexpected keys (1)" in message and "bert.encoder.layer.0.extra.weight" in message

    sd = dict(base, **{wrong: torch.zeros(36, 32)})
    message = _bert_error(sd)
    assert f"{wrong}: expected (37, 32), got (36, 32)" in message

    sd = dict(base, **{wrong: torch.zeros(36, 32), "junk": torch.zeros(1)})
    del sd[missing]
    message = _bert_error(sd)
    assert all(s in message for s in (missing, wrong, "junk", "3 problems"))


def test_untied_head_and_unfilled_model_params_are_errors(hf_models):
    sd = _state_dict(hf_models["bert"])
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    assert "cls.predictions.decoder.weight differs" in _bert_error(sd)
    # A gated model has parameters no HF checkpoint can fill: never a silent partial load.
    message = _bert_error(_state_dict(hf_models["bert"]), gate="linear")
    assert "model parameters with no HF weight" in message
    assert "encoder/layers_0/attention/gate/kernel" in message


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "opt"}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)
