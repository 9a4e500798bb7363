"""Thin Flax Linen modules over `qtransformers.ops` (and an NNX twin of Attention)."""
from qtransformers.nn.attention import Attention
from qtransformers.nn.attention_spec import ATTENTION_FIELDS, AttentionSpec
from qtransformers.nn.gates import AttentionGate
from qtransformers.nn.layers import MLP, LayerNormQ
from qtransformers.nn.nnx_attention import NnxAttention, NnxAttentionGate, nnx_attention_from_linen
from qtransformers.nn.partitioning import DEFAULT_LOGICAL_AXIS_RULES
from qtransformers.nn.quant_point import QuantPoint
