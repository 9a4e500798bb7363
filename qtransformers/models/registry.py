"""Model presets (paper.md §6), the paper's method settings, and model construction by name."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from qtransformers.models.bert import BertForMaskedLM
from qtransformers.models.config import ModelConfig
from qtransformers.models.encoder import BertSentenceEncoder
from qtransformers.models.opt import OptForCausalLM
from qtransformers.models.vit import VitForImageClassification

_OPT = dict(family="opt", vocab_size=50272, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
            max_len=2048, activation="relu", pre_ln=True, ln_eps=1e-5, final_ln=True,
            dropout_rate=0.1, attention_dropout_rate=0.0, init_std=0.006)
_VIT = dict(family="vit", d_model=384, num_layers=12, num_heads=6, d_ff=1536, pre_ln=True,
            ln_eps=1e-6, final_ln=True, dropout_rate=0.0, attention_dropout_rate=0.0,
            image_size=224, patch_size=16, num_classes=1000, max_len=197, vocab_size=1)
_TINY = dict(d_model=64, num_layers=2, num_heads=4, d_ff=256, max_len=128, vocab_size=512)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "bert_base": {},
    "bert_6l": dict(num_layers=6),
    "bert_tiny": dict(_TINY),
    "opt_125m": dict(_OPT),
    "opt_6l": dict(_OPT, num_layers=6),
    "opt_350m": dict(_OPT, d_model=1024, num_layers=24, num_heads=16, d_ff=4096,
                     word_embed_proj_dim=512, pre_ln=False, final_ln=False),
    "opt_1.3b": dict(_OPT, d_model=2048, num_layers=24, num_heads=32, d_ff=8192),
    "opt_tiny": dict(_OPT, **_TINY),
    "vit_s16": dict(_VIT),
    "vit_tiny": dict(_VIT, d_model=64, num_layers=2, num_heads=4, d_ff=256, image_size=32,
                     patch_size=8, num_classes=10, max_len=17),
}

# The attention settings the paper used per model family (paper.md §2-3, §6).
PAPER_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "bert": {"vanilla": {}, "clipped": dict(softmax="clipped", gamma=-0.025, zeta=1.0),
             "gated": dict(gate="mlp", gate_init=0.5)},
    "opt": {"vanilla": {}, "clipped": dict(softmax="clipped", alpha=12.0),  # T = the trained length
            "gated": dict(gate="linear", gate_init=0.25)},
    "vit": {"vanilla": {}, "clipped": dict(softmax="clipped", gamma=-1e-4, patch_ln=True),
            "gated": dict(gate="linear", gate_init=0.5)},
}

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "bert": BertForMaskedLM, "opt": OptForCausalLM, "vit": VitForImageClassification}


def method_overrides(family: str, method: str) -> dict[str, Any]:
    """The paper's attention settings for `method` in "vanilla" | "clipped" | "gated"."""
    if family not in PAPER_METHODS:
        raise ValueError(f"family={family!r} is unknown; choose one of {tuple(PAPER_METHODS)}.")
    methods = PAPER_METHODS[family]
    if method not in methods:
        raise ValueError(f"method={method!r} is unknown; choose one of {tuple(methods)}.")
    return dict(methods[method])


def get_model_config(preset: str, method: str = "vanilla", trained_seq_len: int | None = None,
                     **overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset name, a paper method and field overrides (flat keys).

    trained_seq_len: the sequence length the model will train at, T of γ = −α / T when α is
    set and alpha_seq_len is not (OPT's clipped method: α = 12, so γ = −12/512 at 512); None =
    max_len (see `models.config.sequence_length_of`).
    """
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model preset {preset!r} is unknown; choose one of "
                         f"{tuple(MODEL_PRESETS)}.")
    values = dict(MODEL_PRESETS[preset])
    values.update(method_overrides(values.get("family", "bert"), method))
    values.update(overrides)
    return ModelConfig.from_dict(values, trained_seq_len)


def build_model(config: ModelConfig) -> nn.Module:
    """The Flax model for a ModelConfig (BertForMaskedLM, OptForCausalLM or ViT; a
    BertSentenceEncoder when config.pooling is set)."""
    if config.pooling is not None:
        return BertSentenceEncoder(config)
    return MODEL_CLASSES[config.family](config)
