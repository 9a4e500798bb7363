"""Analytic sizes of the models `build_model` makes: parameter counts (equal to their init),
training FLOPs per token and activation elements per token. No tracing, so a plan for
OPT-1.3B prints in milliseconds (`qtransformers.planner`)."""
from __future__ import annotations

from qtransformers.hardware import train_flops_per_token
from qtransformers.models.config import ModelConfig
from qtransformers.ops.gates import gate_param_count


def layer_param_count(cfg: ModelConfig) -> int:
    """Parameters of one TransformerBlock: attention (+ gate), MLP, two LayerNorms."""
    d, d_ff = cfg.d_model, cfg.d_ff
    attention = 4 * (d * d + d) + gate_param_count(cfg.attention.gate, d, cfg.num_heads,
                                                   cfg.attention.gate_hidden)
    return attention + (d * d_ff + d_ff) + (d_ff * d + d) + 2 * 2 * d


def embedding_param_count(cfg: ModelConfig) -> int:
    """Parameters outside the blocks: embeddings, heads, final LayerNorms."""
    d = cfg.d_model
    if cfg.family == "bert":
        head = d * d + d + 2 * d + cfg.vocab_size
        return (cfg.vocab_size + cfg.max_len + cfg.type_vocab_size) * d + 2 * d + head
    if cfg.family == "opt":
        embed_dim = cfg.word_embed_proj_dim or d
        projections = 2 * embed_dim * d if embed_dim != d else 0
        return (cfg.vocab_size * embed_dim + (cfg.max_len + 2) * d + projections
                + (2 * d if cfg.final_ln else 0))
    patch = cfg.patch_size ** 2 * cfg.num_channels * d + d
    return (patch + (2 * d if cfg.patch_ln else 0) + d + (cfg.num_patches + 1) * d + 2 * d
            + d * cfg.num_classes + cfg.num_classes)


def count_params(cfg: ModelConfig) -> int:
    """Total parameters of the model `build_model(cfg)` builds (equals its init)."""
    return embedding_param_count(cfg) + cfg.num_layers * layer_param_count(cfg)


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks' weights (not their biases
    and LayerNorms) and, for text models, the tied output head."""
    matmul = cfg.num_layers * (layer_param_count(cfg) - 4 * cfg.d_model)
    if cfg.family in ("bert", "opt"):
        matmul += cfg.vocab_size * (cfg.word_embed_proj_dim or cfg.d_model)
    return matmul


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 x matmul params + attention's 12 x L x T x d (fwd + bwd)."""
    return train_flops_per_token(matmul_param_count(cfg), cfg.num_layers, cfg.d_model,
                                 cfg.sequence_length(seq_len))


def activation_elements_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Elements autodiff keeps per token for the backward pass (no remat).

    Per layer: LayerNorm in/out (4d), Q/K/V (3d), scores and probabilities (2 H T; blocked or
    fused attention: the output, R and two row statistics, 2d + 2H, instead), context and
    attention output (2d), residuals (2d), FFN pre- and post-activation (2 d_ff), FFN output (d),
    plus dropout masks where dropout is on. Output head: logits, softmax, gradient (3 V).
    """
    d, h = cfg.d_model, cfg.num_heads
    per_layer = 12 * d + 2 * cfg.d_ff
    if cfg.attention.attention_impl == "materialized":
        per_layer += 2 * h * seq_len
        if cfg.attention.attention_dropout_rate > 0:
            per_layer += h * seq_len
    else:  # blocked / fused keep the output, its row statistics and (clipped) R instead
        per_layer += 2 * d + 2 * h
    if cfg.dropout_rate > 0:
        per_layer += 2 * d
    if cfg.remat:
        per_layer = d  # only each block's input survives
    # logits, their softmax and the logits gradient are alive together at the peak.
    head = 3 * cfg.vocab_size if cfg.family in ("bert", "opt") else 0
    return cfg.num_layers * per_layer + head + 4 * d
