"""Per-block math of the blocked attention path (`ops.blocked_attention`), one variant at a time.

A block is a (bq queries) x (bk keys) tile of one query block against one key block. Every
function here works on float32 tiles: scores s (B, H, bq, bk), `valid` bool broadcastable to
s, per-row statistics (B, H, bq). The row statistics a variant keeps:

- m: the running / final row max of the valid scores (sink variants: also of the sink logit);
- z: the running sum of the variant's denominator terms, relative to m;
- lse: the row's log-normaliser: probability-like weights are exp(s − lse).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG = float(jnp.finfo(jnp.float32).min)
# Variants whose output is one pass of online softmax-like accumulation.
ONLINE_VARIANTS = ("vanilla", "softmax1", "sink", "softpick")
SINK_VARIANTS = ("softmax1", "sink")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """The static settings of one blocked-attention call (hashable: a custom_vjp static arg)."""

    softmax: str
    gamma: float
    zeta: float
    softpick_eps: float
    causal: bool
    dropout_rate: float
    block_q: int
    block_k: int
    has_mask: bool  # a dense (B, H, Tq, Tk) mask besides key padding and causality
    precision: object = None


def init_row_max(spec: BlockSpec, sink: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Initial running max (B, H, bq): the sink logit for sink variants, else NEG."""
    if spec.softmax in SINK_VARIANTS:
        return jnp.broadcast_to(sink[None, :, None], shape).astype(jnp.float32)
    return jnp.full(shape, NEG, jnp.float32)


def masked_scores(s: jax.Array, valid: jax.Array) -> jax.Array:
    """Scores with invalid entries at NEG (finite, so exp never sees inf − inf)."""
    return jnp.where(valid, s, NEG)


def online_terms(spec: BlockSpec, s: jax.Array, valid: jax.Array,
                 m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(numerator weights, denominator terms) of one tile relative to the row max m (B, H, bq).

    softmax family: both exp(s − m); softpick: relu(u) and |u| with u = exp(s − m) − exp(−m).
    Invalid entries are 0 in both.
    """
    e = jnp.exp(masked_scores(s, valid) - m[..., None])
    if spec.softmax == "softpick":
        u = e - jnp.exp(-m)[..., None]
        u = jnp.where(valid, u, 0.0)
        return jax.nn.relu(u), jnp.abs(u)
    e = jnp.where(valid, e, 0.0)
    return e, e


def extra_denominator(spec: BlockSpec, sink: jax.Array, m: jax.Array) -> jax.Array:
    """What the denominator adds beyond the keys, relative to m: exp(sink − m) or softpick's ε."""
    if spec.softmax in SINK_VARIANTS:
        return jnp.exp(sink[None, :, None] - m)
    if spec.softmax == "softpick":
        return jnp.full_like(m, spec.softpick_eps)
    return jnp.zeros_like(m)


def final_lse(spec: BlockSpec, sink: jax.Array, m: jax.Array, z: jax.Array) -> jax.Array:
    """The log-normaliser lse (B, H, bq) from the final row max and denominator sum.

    Rows with no valid key and no sink (denominator 0) get lse = 0; their weights are all
    masked to 0 anyway.
    """
    denom = z + extra_denominator(spec, sink, m)
    return jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), 0.0)


def clip_unit(y: jax.Array) -> jax.Array:
    """clip(y, 0, 1) as `ops.softmax._clip_unit_interval` (gradient passes on the boundary)."""
    return jnp.where(y < 0, 0.0, jnp.where(y > 1, 1.0, y))


def clipped_weights(spec: BlockSpec, s: jax.Array, valid: jax.Array,
                    lse: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Clipped softmax of a tile given the row lse: (σ, p, gradient mask).

    σ = exp(s − lse) is the softmax, p = clip((ζ − γ) σ + γ, 0, 1), and the gradient passes
    where 0 <= (ζ − γ) σ + γ <= 1. All three are 0 where not valid.
    """
    sigma = jnp.where(valid, jnp.exp(masked_scores(s, valid) - lse[..., None]), 0.0)
    y = (spec.zeta - spec.gamma) * sigma + spec.gamma
    p = jnp.where(valid, clip_unit(y), 0.0)
    passes = valid & (y >= 0) & (y <= 1)
    return sigma, p, passes


def weights_and_score_cotangent(spec: BlockSpec, s: jax.Array, valid: jax.Array,
                                lse: jax.Array, m: jax.Array, dprobs: jax.Array,
                                row_dot: jax.Array, keep_scale: jax.Array | None
                                ) -> tuple[jax.Array, jax.Array]:
    """Backward pass of one tile: (dropped-out probabilities, d loss / d scores).

    Args:
      s, valid: the recomputed tile; lse, m: the row statistics the forward pass saved.
      dprobs: dO · V per entry (B, H, bq, bk): d loss / d (dropped-out) probabilities.
      row_dot: D (B, H, bq) = Σ_k (d loss / d weight_k) weight_k, i.e. dO · O for the softmax
        family and softpick, and dO · R (R = Σ (ζ−γ) σ [passes] v) for clipped.
      keep_scale: dropout keep mask / (1 − rate) broadcastable to the tile, or None.
    Returns:
      the probabilities times keep_scale (for dV) and d loss / d scores, both (B, H, bq, bk).
    """
    d = row_dot[..., None]
    if keep_scale is not None:
        dprobs = dprobs * keep_scale
    if spec.softmax == "clipped":
        sigma, probs, passes = clipped_weights(spec, s, valid, lse)
        ds = sigma * ((spec.zeta - spec.gamma) * jnp.where(passes, dprobs, 0.0) - d)
    elif spec.softmax == "softpick":
        shifted = jnp.exp(masked_scores(s, valid) - m[..., None])
        u = jnp.where(valid, shifted - jnp.exp(-m)[..., None], 0.0)
        to_probs = jnp.exp(m - lse)[..., None]  # 1 / the shifted denominator
        probs = jax.nn.relu(u) * to_probs
        e = jnp.where(valid, shifted * to_probs, 0.0)  # e^(s − lse): d |u| / ds and d u / ds
        ds = e * (jnp.where(u > 0, dprobs, 0.0) - jnp.sign(u) * d)
    else:
        probs = jnp.where(valid, jnp.exp(masked_scores(s, valid) - lse[..., None]), 0.0)
        ds = probs * (dprobs - d)
    return (probs if keep_scale is None else probs * keep_scale), ds
