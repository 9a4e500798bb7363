"""Softmax variants for attention: vanilla, clipped (paper Eq. 4), softmax1 ("off by one"),
learned sinks (gpt-oss) and softpick (rectified softmax).

All functions are pure jnp, jit- and vmap-friendly, and normalise along `axis`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

SOFTMAX_VARIANTS = ("vanilla", "clipped", "softmax1", "sink", "softpick")
# softpick's ε, as in the reference implementation (zaydzuhri/softpick-attention): it is added to
# the max-shifted denominator, so it only matters when every input is (almost) exactly 0.
SOFTPICK_EPS = 1e-8


def validate_clip_params(gamma: float, zeta: float) -> None:
    """Raises ValueError unless gamma <= 0 and zeta >= 1 (paper Eq. 4); traced values pass."""
    if isinstance(gamma, jax.core.Tracer) or isinstance(zeta, jax.core.Tracer):
        return
    if not gamma <= 0.0:
        raise ValueError(f"gamma={gamma!r} must be <= 0 (clipped softmax stretches below 0 only); "
                         "use e.g. gamma=-0.025 or gamma_from_alpha(alpha, seq_len).")
    if not zeta >= 1.0:
        raise ValueError(f"zeta={zeta!r} must be >= 1 (zeta < 1 would cap every probability); "
                         "use zeta=1.0.")


def gamma_from_alpha(alpha: float, seq_len: int) -> float:
    """γ = −α / T: the clipped-softmax stretch given relative to the sequence length T.

    Paper: α in [2, 4] works for T in {32..256}; OPT-125m uses α = 12 with T = 512.
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0 (gamma = -alpha / seq_len).")
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int.")
    return -float(alpha) / float(seq_len)


def _masked_logits(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    if where is None:
        return logits
    # finfo.min (not -inf) keeps fully masked rows finite, like flax.linen.dot_product_attention.
    return jnp.where(where, logits, jnp.finfo(logits.dtype).min)


def _clip_unit_interval(y: jax.Array) -> jax.Array:
    """clip(y, 0, 1) whose gradient passes at the boundaries 0 and 1 (like torch.clamp).

    jnp.clip splits the gradient 0.5/0.5 at ties; the reference (PyTorch) passes it in full
    where softmax == 1 exactly (the first token of causal attention with zeta = 1).
    """
    return jnp.where(y < 0, jnp.zeros_like(y), jnp.where(y > 1, jnp.ones_like(y), y))


def softmax(logits: jax.Array, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Vanilla softmax with an optional boolean mask.

    Args:
      logits: any shape, e.g. (B, H, Tq, Tk) attention scores.
      axis: the normalised (key) axis.
      where: boolean, broadcastable to `logits`; False entries come out exactly 0.
    Returns:
      probabilities, same shape and dtype as `logits`.
    """
    probs = jax.nn.softmax(_masked_logits(logits, where), axis=axis)
    return probs if where is None else jnp.where(where, probs, 0.0).astype(probs.dtype)


def clipped_softmax(logits: jax.Array, gamma: float = 0.0, zeta: float = 1.0, axis: int = -1,
                    where: jax.Array | None = None) -> jax.Array:
    """Clipped softmax, paper Eq. 4: clip((ζ − γ) · softmax(x) + γ, 0, 1).

    With γ < 0, probabilities below −γ / (ζ − γ) become exactly 0, so a head can attend to
    nothing without pushing its logits to extremes. Rows no longer sum to 1. Clipped entries get
    no gradient; entries exactly on the boundary (softmax == 1 with ζ = 1) pass it.

    Args:
      logits: any shape, e.g. (B, H, Tq, Tk).
      gamma: stretch below 0; must be <= 0 (0 with ζ = 1 is the vanilla softmax).
      zeta: stretch above 1; must be >= 1.
      axis: the normalised (key) axis.
      where: boolean mask broadcastable to `logits`; False (masked) entries come out exactly 0.
    Returns:
      clipped probabilities in [0, 1], same shape and dtype as `logits`.
    """
    validate_clip_params(gamma, zeta)
    probs = jax.nn.softmax(_masked_logits(logits, where), axis=axis)
    out = _clip_unit_interval((zeta - gamma) * probs + gamma).astype(probs.dtype)
    return out if where is None else jnp.where(where, out, 0.0).astype(out.dtype)


def sink_softmax(logits: jax.Array, sink: jax.Array | float, axis: int = -1,
                 where: jax.Array | None = None) -> jax.Array:
    """Softmax with one extra logit per row that takes probability but has no value (gpt-oss).

    p_i = exp(x_i) / (exp(s) + Σ_j exp(x_j)). The sink `s` absorbs what the head does not want
    to spend; rows sum to 1 − exp(s) / (exp(s) + Σ_j exp(x_j)) < 1. s = 0 is softmax1.

    Args:
      logits: (B, H, Tq, Tk) attention scores (any shape, normalised along `axis`).
      sink: the sink logit, broadcastable to `logits` with size 1 on `axis`, e.g. (H, 1, 1) for
        one learned logit per head, or a scalar.
      axis: the normalised (key) axis.
      where: boolean mask broadcastable to `logits`; False entries come out exactly 0.
    Returns:
      probabilities of the real keys, same shape and dtype as `logits`.
    """
    masked = _masked_logits(logits, where)
    sink = jnp.asarray(sink, logits.dtype)
    row_max = jax.lax.stop_gradient(jnp.maximum(jnp.max(masked, axis=axis, keepdims=True), sink))
    exps = jnp.exp(masked - row_max)
    if where is not None:
        exps = jnp.where(where, exps, 0.0)
    return exps / (jnp.exp(sink - row_max) + jnp.sum(exps, axis=axis, keepdims=True))


def softmax1(logits: jax.Array, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Softmax with an extra zero logit ("off by one"): exp(x_i) / (1 + Σ_j exp(x_j)).

    Rows may sum to less than 1, letting a head output nothing. It is `sink_softmax` with the
    sink fixed at 0. Same shapes as `softmax`.
    """
    return sink_softmax(logits, 0.0, axis=axis, where=where)


def softpick(logits: jax.Array, axis: int = -1, where: jax.Array | None = None,
             eps: float = SOFTPICK_EPS) -> jax.Array:
    """Softpick (Zuhri et al. 2025), a rectified softmax: relu(eˣⁱ − 1) / (Σ_j |eˣʲ − 1| + ε).

    Computed as the reference does, shifted by the row max m over the unmasked keys:
    relu(e^(x_i−m) − e^(−m)) / (Σ_j |e^(x_j−m) − e^(−m)| + ε); m carries no gradient (it only
    moves ε). Logits <= 0 get probability exactly 0 and rows need not sum to 1. Masked keys
    take no part (as the reference's −inf logits); fully masked rows come out 0.

    Args:
      logits: (B, H, Tq, Tk) attention scores (any shape, normalised along `axis`).
      axis: the normalised (key) axis.
      where: boolean mask broadcastable to `logits`; False entries come out exactly 0.
      eps: ε of the shifted denominator.
    Returns:
      probabilities, same shape and dtype as `logits`.
    """
    masked = _masked_logits(logits, where)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=axis, keepdims=True))
    shifted = jnp.exp(masked - row_max) - jnp.exp(-row_max)
    if where is not None:
        shifted = jnp.where(where, shifted, 0.0)
    return jax.nn.relu(shifted) / (jnp.sum(jnp.abs(shifted), axis=axis, keepdims=True) + eps)


def get_softmax_fn(softmax_name: str = "vanilla", gamma: float = 0.0, zeta: float = 1.0,
                   sink: jax.Array | float | None = None) -> Callable[..., jax.Array]:
    """Returns `fn(logits, axis=-1, where=None) -> probs` for a softmax variant by name.

    Args:
      softmax_name: one of SOFTMAX_VARIANTS.
      gamma, zeta: clipped-softmax parameters (only used by "clipped"; validated always).
      sink: the sink logit(s) of "sink" (see `sink_softmax`); None there means 0.
    """
    if softmax_name not in SOFTMAX_VARIANTS:
        raise ValueError(f"softmax={softmax_name!r} is unknown; choose one of {SOFTMAX_VARIANTS}.")
    validate_clip_params(gamma, zeta)
    if softmax_name == "vanilla":
        return softmax
    if softmax_name == "softmax1":
        return softmax1
    if softmax_name == "sink":
        return functools.partial(sink_softmax, sink=0.0 if sink is None else sink)
    if softmax_name == "softpick":
        return softpick
    return functools.partial(clipped_softmax, gamma=gamma, zeta=zeta)
