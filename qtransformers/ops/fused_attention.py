"""Attention through `jax.nn.dot_product_attention` (XLA, or cuDNN flash kernels on GPU).

`jax.nn.dot_product_attention` computes softmax(Q Kᵀ / sqrt(D) + bias, where=mask) V. It can
express the vanilla softmax and, with one extra key, the sink variants: a key of zeros with a
zero value scores 0 against every query, so its logit is the bias of that column, i.e. the sink
logit (0 for softmax1); it takes probability and adds nothing to the output. The clip of
clipped softmax acts on normalised probabilities and softpick is not a softmax at all, so
neither fits: use the blocked path for those. It has no attention dropout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FUSED_VARIANTS = ("vanilla", "softmax1", "sink")


def fused_support_error(softmax: str, dropout: bool = False) -> str | None:
    """One line saying why the fused path cannot run this setting, or None when it can."""
    if softmax not in FUSED_VARIANTS:
        return (f"attention_impl='fused' supports softmax in {FUSED_VARIANTS} "
                f"(jax.nn.dot_product_attention), not {softmax!r}; use attention_impl='blocked'.")
    if dropout:
        return ("attention_impl='fused' has no attention dropout; set the attention dropout "
                "rate to 0 or use attention_impl='blocked'.")
    return None


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    softmax: str = "vanilla", sink: jax.Array | None = None,
                    mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """softmax variant attention via `jax.nn.dot_product_attention`.

    Args:
      query: (B, Tq, H, D); key, value: (B, Tk, H, D).
      softmax: "vanilla" | "softmax1" | "sink".
      sink: (H,) sink logits for "sink" (None: 0).
      mask: bool broadcastable to (B, H, Tq, Tk), True where a key is seen.
      causal: key position <= query position.
    Returns:
      (B, Tq, H, D).
    """
    error = fused_support_error(softmax)
    if error:
        raise ValueError(error)
    if softmax == "vanilla":
        return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal)
    batch, q_len, heads, depth = query.shape
    k_len = key.shape[1]
    # The sink is the last key: zeros, so its score is its bias, the sink logit.
    zeros = jnp.zeros((batch, 1, heads, depth), key.dtype)
    key, value = jnp.concatenate([key, zeros], 1), jnp.concatenate([value, zeros], 1)
    logits = jnp.zeros((heads,), jnp.float32) if softmax == "softmax1" or sink is None else sink
    bias = jnp.zeros((1, heads, 1, k_len + 1), jnp.float32).at[..., -1].set(
        jnp.broadcast_to(logits, (heads,))[None, :, None])
    seen = jnp.ones((1, 1, q_len, k_len), bool)
    if causal:
        seen = seen & jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]
    if mask is not None:
        seen = seen & jnp.asarray(mask, bool)
    seen = jnp.concatenate(
        [seen, jnp.ones(seen.shape[:-1] + (1,), bool)], axis=-1)
    return jax.nn.dot_product_attention(query, key, value, bias=bias.astype(query.dtype),
                                        mask=seen)
