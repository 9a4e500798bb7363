"""BERT for masked language modelling (post-LN, exact GELU; HuggingFace BertForMaskedLM layout)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.models.block import Encoder
from qtransformers.models.config import ModelConfig
from qtransformers.nn.layers import EMBED, LayerNormQ, dense, get_activation
from qtransformers.nn.partitioning import POSITION, VOCAB, partitioned
from qtransformers.nn.quant_point import (EMBEDDINGS_WORD_TYPE, LOGITS, QuantPoint, current_context,
                                          fp_head_table, optional_point)

# The table the MLM decoder is tied to ('/'-joined param path; quant.params keeps an FP copy).
TIED_HEAD_EMBEDDING = "word_embeddings/embedding"


def bert_embeddings(cfg: ModelConfig, input_ids: jax.Array, token_type_ids: jax.Array | None,
                    deterministic: bool) -> tuple[jax.Array, nn.Embed]:
    """BERT's embeddings (word + position + token type -> LayerNorm -> dropout).

    Call from inside the `nn.compact` method of the model: the embedding tables and the
    LayerNorm become that model's submodules (word_embeddings, position_embeddings,
    token_type_embeddings, embeddings_ln), so every BERT variant shares one parameter layout.
    Args: input_ids (B, T) int; token_type_ids (B, T) int or None (all 0).
    Returns: ((B, T, d_model) hidden states, the word nn.Embed for a tied head).
    """
    init = nn.initializers.normal(cfg.init_std)
    seq_len = input_ids.shape[-1]
    if seq_len > cfg.max_len:
        raise ValueError(f"sequence length {seq_len} exceeds model.max_len={cfg.max_len}.")
    word = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=partitioned(init, (VOCAB, EMBED)),
                    name="word_embeddings")
    position = nn.Embed(cfg.max_len, cfg.d_model, name="position_embeddings",
                        embedding_init=partitioned(init, (POSITION, EMBED)))
    token_type = nn.Embed(cfg.type_vocab_size, cfg.d_model, name="token_type_embeddings",
                          embedding_init=partitioned(init, (None, EMBED)))
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    positions = position(jnp.arange(seq_len)[None])
    if EMBEDDINGS_WORD_TYPE in current_context().optional_points:  # the reference's two steps
        x = optional_point(EMBEDDINGS_WORD_TYPE, word(input_ids) + token_type(token_type_ids))
        x = x + positions
    else:
        x = word(input_ids) + positions + token_type(token_type_ids)
    x = QuantPoint(name="embeddings_sum")(x.astype(cfg.compute_dtype))
    x = LayerNormQ(cfg.ln_eps, cfg.compute_dtype, name="embeddings_ln")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic), word


class BertForMaskedLM(nn.Module):
    """Embeddings (word + position + token type) -> LayerNorm -> post-LN encoder -> MLM head.

    The MLM head is transform (Dense, GELU, LayerNorm) + decoder tied to the word embeddings
    + bias; its own params are not quantized by default (quant.config `head` decides what the
    tied decoder uses and whether the optional 'logits' QuantPoint is active).
    Embedding quantization: one QuantPoint 'embeddings_sum' on word + position + token type;
    in the reference's two-step layout the optional point 'embeddings_word_type' first
    quantizes word + token type, then the position is added and 'embeddings_sum' quantizes
    the total.
    Call: input_ids (B, T) int, attention_mask (B, T) 1 for real tokens, token_type_ids (B, T)
      -> logits (B, T, vocab_size) float32; with predict_positions (B, K) int, the MLM head runs
      on those positions only -> (B, K, vocab_size) (training on masked positions).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True,
                 predict_positions: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        x, word = bert_embeddings(cfg, input_ids, token_type_ids, deterministic)
        padding_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = Encoder(cfg, causal=False, name="encoder")(x, padding_mask, deterministic)
        if predict_positions is not None:
            x = jnp.take_along_axis(x, predict_positions[..., None].astype(jnp.int32), axis=1)
        logits = MlmHead(cfg, name="mlm_head")(x, word, fp_head_table(self))
        return optional_point(LOGITS, logits)


class MlmHead(nn.Module):
    """BERT's MLM head: Dense + GELU + LayerNorm, then the tied decoder plus a vocab bias.

    Call: x (B, T, d_model), the word nn.Embed, optionally the (V, d_model) table to decode
      with (default: the word embeddings' own) -> logits (B, T, V) float32.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, word_embeddings: nn.Embed,
                 table: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        h = dense(cfg.d_model, EMBED, EMBED, nn.initializers.normal(cfg.init_std), "transform",
                  cfg.compute_dtype)(x)
        h = get_activation(cfg.activation)(h)
        h = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.compute_dtype, name="transform_ln")(h)
        if table is None:
            logits = word_embeddings.attend(h.astype(jnp.float32))
        else:  # as nn.Embed.attend, with the given table
            logits = jnp.dot(h.astype(jnp.float32), jnp.asarray(table, jnp.float32).T)
        bias = self.param("bias", partitioned(nn.initializers.zeros, (VOCAB,)), (cfg.vocab_size,))
        return logits + bias
