"""Pure attention math shared by the Linen module, the NNX module and `attention_fn`.

Shapes: B batch, T/Tq/Tk lengths, H heads, D head dim. Query/key/value are (B, T, H, D) as in
`flax.linen.dot_product_attention`; scores and probabilities are (B, H, Tq, Tk).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from qtransformers.ops.softmax import gamma_from_alpha, get_softmax_fn


def attention_scores(query: jax.Array, key: jax.Array, precision: Any = None) -> jax.Array:
    """Q Kᵀ / sqrt(D): (B, Tq, H, D), (B, Tk, H, D) -> (B, H, Tq, Tk)."""
    depth = query.shape[-1]
    query = query / jnp.sqrt(depth).astype(query.dtype)
    return jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)


def attention_context(probs: jax.Array, value: jax.Array, precision: Any = None) -> jax.Array:
    """P V: (B, H, Tq, Tk), (B, Tk, H, D) -> (B, Tq, H, D)."""
    return jnp.einsum("...hqk,...khd->...qhd", probs, value, precision=precision)


def causal_mask(q_len: int, k_len: int | None = None) -> jax.Array:
    """Boolean (1, 1, Tq, Tk) mask, True where key position <= query position."""
    k_len = q_len if k_len is None else k_len
    return jnp.tril(jnp.ones((q_len, k_len), dtype=bool))[None, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of broadcastable boolean masks, skipping None; None if all are None."""
    present = [jnp.asarray(m, dtype=bool) for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for mask in present[1:]:
        out = jnp.logical_and(out, mask)
    return out


def padding_to_attention_mask(padding_mask: jax.Array) -> jax.Array:
    """Key padding mask (B, Tk), True for real tokens -> (B, 1, 1, Tk)."""
    return jnp.asarray(padding_mask, dtype=bool)[:, None, None, :]


def attention_dropout(probs: jax.Array, rate: float, rng: jax.Array | None,
                      broadcast: bool = True) -> jax.Array:
    """Inverted dropout on attention probabilities (B, H, Tq, Tk), as flax's attention does.

    With `broadcast`, one keep-mask of shape (Tq, Tk) is shared over batch and heads.
    """
    if rate <= 0.0:
        return probs
    if rng is None:
        raise ValueError("attention dropout with rate > 0 needs a dropout rng "
                         "(pass rngs={'dropout': key} or deterministic=True).")
    keep_prob = 1.0 - rate
    shape = (1,) * (probs.ndim - 2) + probs.shape[-2:] if broadcast else probs.shape
    keep = jax.random.bernoulli(rng, keep_prob, shape)
    return probs * (keep.astype(probs.dtype) / jnp.asarray(keep_prob, probs.dtype))


def dropout_seed(rng: jax.Array) -> jax.Array:
    """Two uint32 words drawn from a PRNG key: the seed of `dropout_keep_mask`."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def _mix32(x: jax.Array) -> jax.Array:
    """A uint32 avalanche hash (Wellons' lowbias32): every input bit flips ~half the output bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(seed: jax.Array, query_pos: jax.Array, key_pos: jax.Array,
                      rate: float) -> jax.Array:
    """Attention-dropout keep mask as a pure function of (seed, query position, key position).

    Any block of the (Tq, Tk) mask can be built on its own and equals the same block of the
    whole mask, so the blocked path drops exactly the entries the materialised path drops.

    Args:
      seed: uint32 (2,), from `dropout_seed(rng)`.
      query_pos: int (Tq,) absolute query positions; key_pos: int (Tk,) key positions.
      rate: dropout probability in [0, 1).
    Returns:
      bool (Tq, Tk), True (kept) with probability 1 − rate, shared over batch and heads.
    """
    q = _mix32(query_pos.astype(jnp.uint32)[:, None] * jnp.uint32(0x9E3779B1) ^ seed[0])
    bits = _mix32((q + key_pos.astype(jnp.uint32)[None, :] * jnp.uint32(0x85EBCA77)) ^ seed[1])
    threshold = min(int(round((1.0 - rate) * 2.0 ** 32)), 2 ** 32 - 1)
    return bits < jnp.uint32(threshold)


def positional_attention_dropout(probs: jax.Array, rate: float,
                                 rng: jax.Array | None) -> jax.Array:
    """Inverted dropout of (B, H, Tq, Tk) probabilities with `dropout_keep_mask` (shared over B, H).

    The dropout of `Attention` on every path; `attention_dropout` keeps flax's own bits for
    `attention_fn`.
    """
    if rate <= 0.0:
        return probs
    if rng is None:
        raise ValueError("attention dropout with rate > 0 needs a dropout rng "
                         "(pass rngs={'dropout': key} or deterministic=True).")
    keep = dropout_keep_mask(dropout_seed(rng), jnp.arange(probs.shape[-2]),
                             jnp.arange(probs.shape[-1]), rate)
    return probs * (keep.astype(probs.dtype) / jnp.asarray(1.0 - rate, probs.dtype))


def attention_fn(softmax: str = "vanilla", gamma: float = 0.0, zeta: float = 1.0,
                 alpha: float | None = None, alpha_seq_len: int | None = None) -> Callable:
    """A drop-in for `flax.linen.dot_product_attention` with a chosen softmax variant.

    Use as `nn.MultiHeadDotProductAttention(attention_fn=attention_fn("clipped", gamma=-0.025))`
    or `nnx.MultiHeadAttention(..., attention_fn=attention_fn(...))`.

    Args:
      softmax: one of SOFTMAX_VARIANTS ("sink" here has its logit fixed at 0, i.e. softmax1).
      gamma, zeta: clipped-softmax stretch (γ <= 0, ζ >= 1).
      alpha, alpha_seq_len: if alpha is given, γ = −α / T with T = alpha_seq_len (required: the
        sequence length the model trains at, so γ stays fixed at any evaluation length).
    Returns:
      fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
         dropout_rate=0., deterministic=False, dtype=None, precision=None, module=None, **kw)
      with query (..., Tq, H, D), key/value (..., Tk, H, D) -> output (..., Tq, H, D).
    """
    if alpha is not None:
        if alpha_seq_len is None:
            raise ValueError(f"alpha={alpha!r} needs alpha_seq_len, the sequence length T of "
                             "gamma = -alpha / T (the length the model trains at).")
        gamma = gamma_from_alpha(alpha, alpha_seq_len)
    softmax_fn = get_softmax_fn(softmax, gamma, zeta)  # validates eagerly, before any tracing

    def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
           dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
           is_causal=False, **unused_kwargs):
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        scores = attention_scores(query, key, precision)
        if bias is not None:
            scores = scores + bias
        if is_causal:
            mask = combine_masks(mask, causal_mask(query.shape[-3], key.shape[-3]))
        probs = softmax_fn(scores, axis=-1, where=mask)
        if module is not None:
            module.sow("intermediates", "attention_weights", probs)
        if not deterministic:
            probs = attention_dropout(probs, dropout_rate, dropout_rng, broadcast_dropout)
        return attention_context(probs, value, precision)

    return fn
