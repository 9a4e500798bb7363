"""HuggingFace BertConfig / OPTConfig / ViTConfig (or their config.json dicts) -> ModelConfig."""
from __future__ import annotations

from typing import Any, Mapping

from qtransformers.models.config import MODEL_FAMILIES, ModelConfig

# HuggingFace's defaults for the fields we read, so a config.json that omits default values
# (HF writes only the differences from the class defaults in some versions) maps correctly
# without `transformers` installed. Values as in transformers' configuration_{bert,opt,vit}.py.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                 type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                 position_embedding_type="absolute", is_decoder=False, tie_word_embeddings=True),
    "opt": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                max_position_embeddings=2048, do_layer_norm_before=True,
                _remove_final_layer_norm=False, word_embed_proj_dim=None, dropout=0.1,
                attention_dropout=0.0, num_attention_heads=12, activation_function="relu",
                init_std=0.02, pad_token_id=1, enable_bias=True,
                layer_norm_elementwise_affine=True, tie_word_embeddings=True),
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=1e-12,
                image_size=224, patch_size=16, num_channels=3, qkv_bias=True),
}

# HF activation names -> ours (`qtransformers.nn.layers.ACTIVATIONS`).
HF_ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu"}

OPT_LN_EPS = 1e-5  # HF OPT builds nn.LayerNorm with torch's default epsilon


def hf_config_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict of a `transformers.PretrainedConfig` or a config.json mapping."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return dict(hf_config.to_dict())
    raise TypeError(f"expected a transformers PretrainedConfig or a config dict, got "
                    f"{type(hf_config).__name__}.")


def detect_family(hf_config: Any, family: str | None = None) -> str:
    """"bert" | "opt" | "vit" from the config's model_type; `family` overrides / must agree."""
    model_type = hf_config_dict(hf_config).get("model_type")
    if family is not None and family not in MODEL_FAMILIES:
        raise ValueError(f"family={family!r} is unknown; choose one of {MODEL_FAMILIES}.")
    if model_type is None:
        if family is None:
            raise ValueError("the HF config has no model_type; pass family='bert'|'opt'|'vit'.")
        return family
    if model_type not in MODEL_FAMILIES:
        raise ValueError(f"HF model_type={model_type!r} is not supported; supported: "
                         f"{MODEL_FAMILIES}.")
    if family not in (None, model_type):
        raise ValueError(f"family={family!r} does not match the HF config's "
                         f"model_type={model_type!r}.")
    return model_type


def _activation(name: Any) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"HF activation {name!r} is not supported; supported: "
                         f"{tuple(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"unsupported HF config: {message}")


def _square(value: Any, name: str) -> int:
    """HF allows image_size / patch_size as an int or an (h, w) pair; we need squares."""
    if isinstance(value, (list, tuple)):
        _require(len(set(value)) == 1, f"{name}={value!r} is not square.")
        value = value[0]
    return int(value)


def _num_labels(cfg: Mapping[str, Any]) -> int:
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return int(cfg.get("num_labels") or 2)


def _bert_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a HF BertConfig (dict with HF_DEFAULTS)."""
    _require(cfg["position_embedding_type"] == "absolute",
             f"position_embedding_type={cfg['position_embedding_type']!r} (need 'absolute').")
    _require(not cfg["is_decoder"], "is_decoder=True (BertForMaskedLM is bidirectional).")
    _require(cfg["tie_word_embeddings"], "tie_word_embeddings=False (our MLM head is tied).")
    return dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        d_ff=cfg["intermediate_size"], max_len=cfg["max_position_embeddings"],
        type_vocab_size=cfg["type_vocab_size"], activation=_activation(cfg["hidden_act"]),
        pre_ln=False, final_ln=False, ln_eps=cfg["layer_norm_eps"],
        dropout_rate=cfg["hidden_dropout_prob"],
        attention_dropout_rate=cfg["attention_probs_dropout_prob"],
        init_std=cfg["initializer_range"], pad_token_id=cfg["pad_token_id"])


def _opt_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a HF OPTConfig (dict with HF_DEFAULTS)."""
    _require(cfg["enable_bias"], "enable_bias=False (our projections have biases).")
    _require(cfg["layer_norm_elementwise_affine"], "layer_norm_elementwise_affine=False.")
    _require(cfg["tie_word_embeddings"], "tie_word_embeddings=False (our LM head is tied).")
    proj_dim = cfg["word_embed_proj_dim"]
    pre_ln = bool(cfg["do_layer_norm_before"])
    return dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        d_ff=cfg["ffn_dim"], max_len=cfg["max_position_embeddings"],
        activation=_activation(cfg["activation_function"]), pre_ln=pre_ln,
        final_ln=pre_ln and not cfg["_remove_final_layer_norm"], ln_eps=OPT_LN_EPS,
        dropout_rate=cfg["dropout"], attention_dropout_rate=cfg["attention_dropout"],
        init_std=cfg["init_std"], pad_token_id=cfg["pad_token_id"],
        word_embed_proj_dim=None if proj_dim in (None, cfg["hidden_size"]) else proj_dim)


def _vit_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a HF ViTConfig (dict with HF_DEFAULTS)."""
    _require(cfg["qkv_bias"], "qkv_bias=False (our query/key/value have biases).")
    image_size = _square(cfg["image_size"], "image_size")
    patch_size = _square(cfg["patch_size"], "patch_size")
    return dict(
        vocab_size=1, d_model=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], d_ff=cfg["intermediate_size"],
        max_len=(image_size // patch_size) ** 2 + 1,
        activation=_activation(cfg["hidden_act"]), pre_ln=True, final_ln=True,
        ln_eps=cfg["layer_norm_eps"], dropout_rate=cfg["hidden_dropout_prob"],
        attention_dropout_rate=cfg["attention_probs_dropout_prob"],
        init_std=cfg["initializer_range"], image_size=image_size, patch_size=patch_size,
        num_channels=cfg["num_channels"], num_classes=_num_labels(cfg))


# The HF checkpoint format of each family (its config keys), read by one function each.
_FIELDS_OF = {"bert": _bert_fields, "opt": _opt_fields, "vit": _vit_fields}


def config_from_hf(hf_config: Any, family: str | None = None, **overrides: Any) -> ModelConfig:
    """ModelConfig for a HF BertConfig, OPTConfig or ViTConfig (object or config.json dict).

    Maps sizes, LayerNorm epsilon, activation (BERT / ViT exact GELU, OPT ReLU), OPT's
    do_layer_norm_before (-> pre_ln, final_ln) and word_embed_proj_dim, position table size,
    token types, ViT image / patch / channels / num_labels, pad_token_id and dropouts. The
    attention method is vanilla; `overrides` set any ModelConfig field (e.g. softmax="clipped").
    Raises ValueError for settings our models cannot express (untied embeddings, no biases...).
    """
    family = detect_family(hf_config, family)
    cfg = {**HF_DEFAULTS[family],
           **{k: v for k, v in hf_config_dict(hf_config).items() if v is not None}}
    values = _FIELDS_OF[family](cfg)
    return ModelConfig.from_dict({"family": family, **values, **overrides})
