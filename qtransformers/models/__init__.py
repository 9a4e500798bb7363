"""BERT / OPT / ViT built from one configurable transformer block."""
from qtransformers.models.bert import BertForMaskedLM, MlmHead
from qtransformers.models.block import Encoder, TransformerBlock
from qtransformers.models.config import ModelConfig
from qtransformers.models.encoder import BertSentenceEncoder, pool_tokens
from qtransformers.models.opt import OptForCausalLM, opt_positions
from qtransformers.models.registry import (MODEL_PRESETS, PAPER_METHODS, build_model,
                                           get_model_config, method_overrides)
from qtransformers.models.vit import VitForImageClassification

__all__ = [
    "BertForMaskedLM", "BertSentenceEncoder", "Encoder", "MODEL_PRESETS", "MlmHead", "ModelConfig", "OptForCausalLM",
    "PAPER_METHODS", "TransformerBlock", "VitForImageClassification", "build_model",
    "get_model_config", "method_overrides", "opt_positions", "pool_tokens",
]
