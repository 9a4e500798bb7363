"""OPT for causal language modelling (HuggingFace OPTForCausalLM layout)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.models.block import Encoder
from qtransformers.models.config import ModelConfig
from qtransformers.nn.layers import EMBED, LayerNormQ, dense
from qtransformers.nn.partitioning import POSITION, VOCAB, partitioned
from qtransformers.nn.quant_point import LOGITS, QuantPoint, fp_head_table, optional_point

# OPT's learned positions are offset by 2 (an artefact of fairseq's padding handling).
OPT_POSITION_OFFSET = 2
# The table the LM head is tied to ('/'-joined param path; quant.params keeps an FP copy).
TIED_HEAD_EMBEDDING = "embed_tokens/embedding"


def opt_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids as HuggingFace OPT computes them: (B, T) mask -> (B, T) ids >= 2.

    Positions count real tokens only, so left-padded rows start at position 0 (+ offset).
    """
    mask = attention_mask.astype(jnp.int32)
    return (jnp.cumsum(mask, axis=-1) * mask - 1) + OPT_POSITION_OFFSET


class OptForCausalLM(nn.Module):
    """Token + learned position embeddings -> decoder (pre-LN by default) -> final LN -> tied head.

    OPT-350m style models (word_embed_proj_dim != d_model) project embeddings in and out.
    The head multiplies by `fp_head_table` (the FP copy when quant.config `head='fp'`); its output
    is the optional QuantPoint 'logits' (the reference's quant_setup='all').
    Call: input_ids (B, T) int, attention_mask (B, T) 1 for real tokens
      -> logits (B, T, vocab_size) float32 (logits at t predict token t + 1).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_len={cfg.max_len}.")
        embed_dim = cfg.word_embed_proj_dim or cfg.d_model
        tokens = nn.Embed(cfg.vocab_size, embed_dim, name="embed_tokens",
                          embedding_init=partitioned(init, (VOCAB, EMBED)))
        positions = nn.Embed(cfg.max_len + OPT_POSITION_OFFSET, cfg.d_model, name="embed_positions",
                             embedding_init=partitioned(init, (POSITION, EMBED)))
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        x = tokens(input_ids)
        if embed_dim != cfg.d_model:
            x = dense(cfg.d_model, None, EMBED, init, "project_in", use_bias=False)(x)
        x = x + positions(opt_positions(attention_mask))
        x = QuantPoint(name="embeddings_sum")(x.astype(cfg.compute_dtype))
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic)

        x = Encoder(cfg, causal=True, name="decoder")(x, attention_mask.astype(bool), deterministic)
        if cfg.final_ln:
            x = LayerNormQ(cfg.ln_eps, cfg.compute_dtype, name="final_ln")(x)
        if embed_dim != cfg.d_model:
            x = dense(embed_dim, EMBED, None, init, "project_out", use_bias=False)(x)
        table = fp_head_table(self)
        if table is None:
            logits = tokens.attend(x.astype(jnp.float32))
        else:  # as nn.Embed.attend, with the full-precision table
            logits = jnp.dot(x.astype(jnp.float32), jnp.asarray(table, jnp.float32).T)
        return optional_point(LOGITS, logits)
