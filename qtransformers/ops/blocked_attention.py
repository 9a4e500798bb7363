"""Memory-efficient attention for every softmax variant: blocks over queries and keys.

Memory is O(T · block) in the forward and the backward pass instead of the materialised
path's O(T²): no (B, H, Tq, Tk) tensor is ever built; the backward pass (a custom VJP)
recomputes each (block_q x block_k) tile of scores from Q and K.

- vanilla, softmax1, sink, softpick: one pass of online (running-max) accumulation per query
  block, as flash attention. Softpick's denominator Σ|e^(x−m) − e^(−m)| rescales with the
  running max m exactly as softmax's does.
- clipped: two passes, since the clip needs the *normalised* probabilities: pass 1 gets each
  row's log-sum-exp over the key blocks, pass 2 accumulates clip((ζ−γ)·exp(s − lse) + γ, 0, 1)·V.
  Pass 2 also accumulates R = Σ (ζ−γ)·σ·[not clipped]·V, which turns the backward pass's
  row term Σ_k σ_k dσ_k into dO · R, so the backward pass is one pass too.

Pure JAX (lax.map / fori_loop), so it runs on CPU, GPU and TPU; numerically it equals the
materialised path up to float rounding. The attention probabilities are never materialised, so
the PTQ points on scores / probabilities are not available here (see `nn.Attention`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtransformers.ops import attention_blocks as blk
from qtransformers.ops.attention import dropout_keep_mask, dropout_seed
from qtransformers.ops.softmax import SOFTMAX_VARIANTS, SOFTPICK_EPS, validate_clip_params

F32 = jnp.float32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _num_key_blocks(spec: blk.BlockSpec, i: jax.Array, num_k_blocks: int) -> jax.Array:
    """Key blocks query block i needs: all, or (causal) up to the one holding its last query."""
    if not spec.causal:
        return num_k_blocks
    last_query = (i + 1) * spec.block_q - 1
    return jnp.minimum(num_k_blocks, last_query // spec.block_k + 1)


def _tile(spec, q_blk, key, value, key_valid, mask, seed, i, j):
    """Scores (B, H, bq, bk) float32, validity, dropout scale and K, V blocks of tile (i, j)."""
    bq, bk = spec.block_q, spec.block_k
    k_blk = jax.lax.dynamic_slice_in_dim(key, j * bk, bk, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(value, j * bk, bk, axis=1)
    s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, precision=spec.precision,
                   preferred_element_type=F32)
    q_pos = i * bq + jnp.arange(bq)
    k_pos = j * bk + jnp.arange(bk)
    valid = jax.lax.dynamic_slice_in_dim(key_valid, j * bk, bk, axis=1)[:, None, None, :]
    if spec.causal:
        valid = valid & (k_pos[None, :] <= q_pos[:, None])[None, None]
    if spec.has_mask:
        valid = valid & jax.lax.dynamic_slice(
            mask, (0, 0, i * bq, j * bk), (mask.shape[0], mask.shape[1], bq, bk))
    keep_scale = None
    if spec.dropout_rate > 0:
        keep = dropout_keep_mask(seed, q_pos, k_pos, spec.dropout_rate)
        keep_scale = (keep.astype(F32) / (1.0 - spec.dropout_rate))[None, None]
    return s, valid, keep_scale, k_blk, v_blk


def _weighted_values(weights: jax.Array, v_blk: jax.Array, precision) -> jax.Array:
    """(..., B, H, bq, bk) weights @ (B, bk, H, D) values -> (..., B, bq, H, D) float32."""
    return jnp.einsum("...bhqk,bkhd->...bqhd", weights.astype(v_blk.dtype), v_blk,
                      precision=precision, preferred_element_type=F32)


def _rows_to_tokens(x: jax.Array) -> jax.Array:
    """(B, H, bq) row statistic -> (B, bq, H, 1), to scale (B, bq, H, D) accumulators."""
    return jnp.transpose(x, (0, 2, 1))[..., None]


def _forward_block(spec, query, key, value, sink, seed, key_valid, mask, i):
    """Output (B, bq, H, D), R or None, lse and m (B, H, bq) of query block i."""
    q_blk = jax.lax.dynamic_slice_in_dim(query, i * spec.block_q, spec.block_q, axis=1)
    batch, _, heads, depth = q_blk.shape
    rows = (batch, heads, spec.block_q)
    n_kb = _num_key_blocks(spec, i, key.shape[1] // spec.block_k)
    online = spec.softmax in blk.ONLINE_VARIANTS

    def stats_step(j, carry):
        m, z, acc = carry
        s, valid, keep_scale, _, v_blk = _tile(spec, q_blk, key, value, key_valid, mask, seed,
                                               i, j)
        m_new = jnp.maximum(m, jnp.max(blk.masked_scores(s, valid), axis=-1))
        rescale = jnp.exp(m - m_new)
        numerator, denominator = blk.online_terms(spec, s, valid, m_new)
        z = z * rescale + jnp.sum(denominator, axis=-1)
        if online:
            weights = numerator if keep_scale is None else numerator * keep_scale
            acc = acc * _rows_to_tokens(rescale) + _weighted_values(weights, v_blk,
                                                                    spec.precision)
        return m_new, z, acc

    acc0 = jnp.zeros((batch, spec.block_q, heads, depth), F32) if online else jnp.zeros((), F32)
    m, z, acc = jax.lax.fori_loop(0, n_kb, stats_step, (
        blk.init_row_max(spec, sink, rows), jnp.zeros(rows, F32), acc0))
    lse = blk.final_lse(spec, sink, m, z)
    if online:
        return acc * _rows_to_tokens(jnp.exp(m - lse)), None, lse, m

    def clipped_step(j, carry):
        s, valid, keep_scale, _, v_blk = _tile(spec, q_blk, key, value, key_valid, mask, seed,
                                               i, j)
        sigma, p, passes = blk.clipped_weights(spec, s, valid, lse)
        r = jnp.where(passes, (spec.zeta - spec.gamma) * sigma, 0.0)
        both = jnp.stack([p, r]) if keep_scale is None else jnp.stack([p, r]) * keep_scale
        return carry + _weighted_values(both, v_blk, spec.precision)

    out_r = jax.lax.fori_loop(0, n_kb, clipped_step,
                              jnp.zeros((2, batch, spec.block_q, heads, depth), F32))
    return out_r[0], out_r[1], lse, m


def _unblock(x: jax.Array, axis: int) -> jax.Array:
    """(nq, ..., bq at `axis` + 1, ...) stacked per-block results -> blocks joined on `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _forward(spec, query, key, value, sink, seed, key_valid, mask):
    num_q_blocks = query.shape[1] // spec.block_q
    out, r, lse, m = jax.lax.map(
        lambda i: _forward_block(spec, query, key, value, sink, seed, key_valid, mask, i),
        jnp.arange(num_q_blocks))
    out, lse, m = _unblock(out, 1), _unblock(lse, 2), _unblock(m, 2)
    r = None if r is None else _unblock(r, 1)
    return out, r, lse, m


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(spec, query, key, value, sink, seed, key_valid, mask):
    return _forward(spec, query, key, value, sink, seed, key_valid, mask)[0].astype(query.dtype)


def _blocked_fwd(spec, query, key, value, sink, seed, key_valid, mask):
    out, r, lse, m = _forward(spec, query, key, value, sink, seed, key_valid, mask)
    residuals = (query, key, value, sink, seed, key_valid, mask, out, r, lse, m)
    return out.astype(query.dtype), residuals


def _blocked_bwd(spec, residuals, d_out):
    query, key, value, sink, seed, key_valid, mask, out, r, lse, m = residuals
    d_out = d_out.astype(F32)
    # D = Σ_k (d loss / d weight_k) weight_k per row: dO · O (softmax family, softpick), dO · R.
    row_dot = jnp.transpose(jnp.sum(d_out * (out if r is None else r), axis=-1), (0, 2, 1))
    bq, num_k_blocks = spec.block_q, key.shape[1] // spec.block_k

    def query_block(carry, i):
        q_blk = jax.lax.dynamic_slice_in_dim(query, i * bq, bq, axis=1)
        do_blk = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1)
        lse_i, m_i, d_i = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)
                           for x in (lse, m, row_dot))

        def key_block(j, inner):
            dq_blk, dk, dv = inner
            s, valid, keep_scale, k_blk, v_blk = _tile(spec, q_blk, key, value, key_valid, mask,
                                                       seed, i, j)
            dprobs = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_blk.astype(F32),
                                precision=spec.precision)
            weights, ds = blk.weights_and_score_cotangent(spec, s, valid, lse_i, m_i, dprobs,
                                                          d_i, keep_scale)
            dq_blk = dq_blk + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk.astype(F32),
                                         precision=spec.precision)
            dk_blk = jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk.astype(F32),
                                precision=spec.precision)
            dv_blk = jnp.einsum("bhqk,bqhd->bkhd", weights, do_blk, precision=spec.precision)
            start = j * spec.block_k
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, spec.block_k, 1) + dk_blk, start, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, spec.block_k, 1) + dv_blk, start, 1)
            return dq_blk, dk, dv

        dk, dv = carry
        dq_blk, dk, dv = jax.lax.fori_loop(
            0, _num_key_blocks(spec, i, num_k_blocks), key_block,
            (jnp.zeros(q_blk.shape, F32), dk, dv))
        return (dk, dv), dq_blk

    zeros_kv = jnp.zeros(key.shape, F32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros_kv, zeros_kv),
                                jnp.arange(query.shape[1] // bq))
    dq = _unblock(dq, 1)
    # The sink's probability exp(sink − lse) moves against every row's D: d sink = −Σ p_sink D.
    dsink = -jnp.sum(jnp.exp(sink[None, :, None] - lse) * row_dot, axis=(0, 2))
    if spec.softmax not in blk.SINK_VARIANTS:
        dsink = jnp.zeros_like(sink)
    return (dq.astype(query.dtype), dk.astype(key.dtype), dv.astype(value.dtype),
            dsink.astype(sink.dtype), None, None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      softmax: str = "vanilla", gamma: float = 0.0, zeta: float = 1.0,
                      sink: jax.Array | None = None, key_mask: jax.Array | None = None,
                      mask: jax.Array | None = None, causal: bool = False,
                      dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                      block_q: int = 256, block_k: int = 256,
                      softpick_eps: float = SOFTPICK_EPS, precision=None) -> jax.Array:
    """Attention softmax(Q Kᵀ / sqrt(D)) V for any softmax variant, in blocks.

    Equals `attention_context(softmax_fn(attention_scores(q, k), where=mask), v)` of the
    materialised path (with `positional_attention_dropout` for dropout) up to float rounding,
    forward and backward, at O(T · block) memory. Lengths need not divide the block sizes
    (inputs are padded internally).

    Args:
      query: (B, Tq, H, D); key, value: (B, Tk, H, D).
      softmax: one of SOFTMAX_VARIANTS; gamma, zeta: clipped softmax's γ <= 0, ζ >= 1.
      sink: (H,) learned sink logits of softmax="sink" (None: 0, i.e. softmax1).
      key_mask: (B, Tk) bool, True for real (non-padding) keys.
      mask: optional bool broadcastable to (B, H, Tq, Tk) (built densely; prefer key_mask and
        causal, which cost nothing).
      causal: key position <= query position; key blocks above the diagonal are skipped.
      dropout_rate, dropout_rng: attention dropout with `dropout_keep_mask`, the same mask the
        materialised path of `nn.Attention` uses.
      block_q, block_k: tile sizes (clamped to the lengths).
      softpick_eps: softpick's ε.
    Returns:
      (B, Tq, H, D) in query's dtype.
    """
    if softmax not in SOFTMAX_VARIANTS:
        raise ValueError(f"softmax={softmax!r} is unknown; choose one of {SOFTMAX_VARIANTS}.")
    validate_clip_params(gamma, zeta)
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q={block_q} and block_k={block_k} must be positive.")
    batch, q_len, heads, depth = query.shape
    k_len = key.shape[1]
    bq, bk = min(block_q, q_len), min(block_k, k_len)
    q_pad, k_pad = _round_up(q_len, bq) - q_len, _round_up(k_len, bk) - k_len
    dropout_active = dropout_rate > 0.0
    if dropout_active and dropout_rng is None:
        raise ValueError("attention dropout with rate > 0 needs a dropout rng "
                         "(pass rngs={'dropout': key} or deterministic=True).")
    spec = blk.BlockSpec(
        softmax=softmax, gamma=float(gamma), zeta=float(zeta), softpick_eps=float(softpick_eps),
        causal=causal, dropout_rate=float(dropout_rate) if dropout_active else 0.0,
        block_q=bq, block_k=bk, has_mask=mask is not None, precision=precision)

    scaled = query / jnp.sqrt(depth).astype(query.dtype)
    scaled = jnp.pad(scaled, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
    key = jnp.pad(key, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
    value = jnp.pad(value, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
    key_valid = jnp.ones((1, k_len), bool) if key_mask is None else jnp.asarray(key_mask, bool)
    key_valid = jnp.pad(key_valid, ((0, 0), (0, k_pad)))
    if mask is None:
        dense = jnp.ones((1, 1, 1, 1), bool)
    else:
        dense = jnp.asarray(mask, bool)
        dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
        dense = jnp.broadcast_to(dense, dense.shape[:2] + (q_len, k_len))
        dense = jnp.pad(dense, ((0, 0), (0, 0), (0, q_pad), (0, k_pad)))
    sink = jnp.zeros((heads,), F32) if sink is None or softmax != "sink" else jnp.broadcast_to(
        jnp.asarray(sink, F32), (heads,))
    seed = dropout_seed(dropout_rng) if dropout_active else jnp.zeros((2,), jnp.uint32)
    out = _blocked(spec, scaled, key, value, sink, seed, key_valid, dense)
    return out[:, :q_len]
