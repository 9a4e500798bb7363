"""A head-less BERT sentence encoder: embeddings -> post-LN encoder -> pooling (-> L2 norm).

The HuggingFace `BertModel` without its pooler, followed by the pooling of a
sentence-transformers model (its `1_Pooling/config.json`): the mean of the real tokens' last
hidden states, the [CLS] token's, or their element-wise max; optionally L2-normalised (a
`Normalize` module). Parameters are laid out as in `BertForMaskedLM` without `mlm_head`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.models.bert import bert_embeddings
from qtransformers.models.block import Encoder
from qtransformers.models.config import POOLINGS, ModelConfig

# sentence-transformers' fill value for padded tokens under max pooling.
MAX_POOL_PAD = -1e9
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


def pool_tokens(hidden: jax.Array, attention_mask: jax.Array | None, pooling: str,
                normalize: bool = False) -> jax.Array:
    """One embedding per sequence, as sentence-transformers' Pooling (+ Normalize) computes it.

    Args:
      hidden: (B, T, d) last hidden states.
      attention_mask: (B, T), 1 / True for real tokens (None: all real).
      pooling: 'mean' (sum of real tokens / their count), 'cls' (token 0) or 'max' (padded
        tokens set to -1e9 first).
      normalize: divide by max(||e||_2, 1e-12).
    Returns:
      (B, d) float32.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is unknown; choose one of {POOLINGS}.")
    h = hidden.astype(jnp.float32)
    mask = (jnp.ones(h.shape[:2], jnp.float32) if attention_mask is None
            else attention_mask.astype(jnp.float32))[..., None]
    if pooling == "cls":
        out = h[:, 0]
    elif pooling == "mean":
        out = jnp.sum(h * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    else:
        out = jnp.max(jnp.where(mask > 0, h, MAX_POOL_PAD), axis=1)
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), NORM_EPS)
    return out


class BertSentenceEncoder(nn.Module):
    """BERT embeddings + encoder (no MLM head), pooled per `config.pooling`.

    Call: input_ids (B, T) int, attention_mask (B, T) 1 for real tokens, token_type_ids (B, T)
      -> (B, d_model) float32 embeddings; with return_hidden=True the (B, T, d_model) last
      hidden states instead.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, deterministic: bool = True,
                 return_hidden: bool = False) -> jax.Array:
        cfg = self.config
        if cfg.pooling is None:
            raise ValueError("BertSentenceEncoder needs model.pooling ('mean' | 'cls' | 'max').")
        x, _ = bert_embeddings(cfg, input_ids, token_type_ids, deterministic)
        padding_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = Encoder(cfg, causal=False, name="encoder")(x, padding_mask, deterministic)
        if return_hidden:
            return x
        return pool_tokens(x, attention_mask, cfg.pooling, cfg.normalize_embeddings)
