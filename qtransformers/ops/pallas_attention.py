"""A Pallas kernel of the two-pass clipped-softmax attention forward pass (experimental).

One kernel instance per (batch · head, query block): pass 1 runs over the key blocks for each
query row's max and log-sum-exp, pass 2 accumulates clip((ζ−γ)·exp(s − lse) + γ, 0, 1)·V and
R = Σ (ζ−γ)·σ·[not clipped]·V. It writes exactly the residuals of `ops.blocked_attention`, whose
backward pass (tiles recomputed in pure JAX) it reuses, so gradients are the blocked path's.

Status: tested on the CPU in Pallas interpret mode only (`interpret=True`, the default here);
no GPU or TPU was at hand to compile or time it. It supports causal and key-padding masks, no
dropout and no dense mask; `nn.Attention` does not route to it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qtransformers.ops import attention_blocks as blk
from qtransformers.ops.blocked_attention import _blocked_bwd, _round_up
from qtransformers.ops.softmax import validate_clip_params

F32 = jnp.float32


def _kernel(q_ref, k_ref, v_ref, valid_ref, out_ref, r_ref, lse_ref, *,
            spec: blk.BlockSpec, num_k_blocks: int):
    """q (bq, D), k / v (Tk, D), valid (Tk,) of one batch · head -> out, R (bq, D), lse (bq,)."""
    bq, bk = spec.block_q, spec.block_k
    i = pl.program_id(1)
    q = q_ref[...].astype(F32)
    q_pos = i * bq + jnp.arange(bq)
    n_kb = num_k_blocks
    if spec.causal:
        n_kb = jnp.minimum(num_k_blocks, ((i + 1) * bq - 1) // bk + 1)

    def tile(j):
        k = k_ref[pl.ds(j * bk, bk), :].astype(F32)
        v = v_ref[pl.ds(j * bk, bk), :].astype(F32)
        s = jnp.dot(q, k.T)
        valid = jnp.broadcast_to(valid_ref[pl.ds(j * bk, bk)][None, :] != 0, (bq, bk))
        if spec.causal:
            valid = valid & ((j * bk + jnp.arange(bk))[None, :] <= q_pos[:, None])
        return s, valid, v

    def stats(j, carry):
        m, z = carry
        s, valid, _ = tile(j)
        masked = jnp.where(valid, s, blk.NEG)
        m_new = jnp.maximum(m, jnp.max(masked, axis=-1))
        e = jnp.where(valid, jnp.exp(masked - m_new[:, None]), 0.0)
        return m_new, z * jnp.exp(m - m_new) + jnp.sum(e, axis=-1)

    m, z = jax.lax.fori_loop(0, n_kb, stats, (jnp.full((bq,), blk.NEG, F32),
                                              jnp.zeros((bq,), F32)))
    lse = jnp.where(z > 0, m + jnp.log(jnp.where(z > 0, z, 1.0)), 0.0)

    def accumulate(j, carry):
        acc, racc = carry
        s, valid, v = tile(j)
        sigma = jnp.where(valid, jnp.exp(jnp.where(valid, s, blk.NEG) - lse[:, None]), 0.0)
        y = (spec.zeta - spec.gamma) * sigma + spec.gamma
        p = jnp.where(valid, blk.clip_unit(y), 0.0)
        r = jnp.where(valid & (y >= 0) & (y <= 1), (spec.zeta - spec.gamma) * sigma, 0.0)
        return acc + jnp.dot(p, v), racc + jnp.dot(r, v)

    depth = q.shape[-1]
    acc, racc = jax.lax.fori_loop(0, n_kb, accumulate, (jnp.zeros((bq, depth), F32),
                                                        jnp.zeros((bq, depth), F32)))
    out_ref[...] = acc
    r_ref[...] = racc
    lse_ref[...] = lse


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, T, H, D) -> (B · H, T, D)."""
    b, t, h, d = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t, d)


def _pallas_forward(spec, query, key, value, key_valid, interpret):
    """out, R (B, Tq, H, D) float32 and lse (B, H, Tq) from the kernel (padded inputs)."""
    batch, q_len, heads, depth = query.shape
    k_len = key.shape[1]
    valid = jnp.broadcast_to(key_valid, (batch, k_len)).astype(jnp.int32)
    valid = jnp.repeat(valid, heads, axis=0)  # (B · H, Tk), batch-major as _heads_first
    kernel = functools.partial(_kernel, spec=spec, num_k_blocks=k_len // spec.block_k)
    row_spec = pl.BlockSpec((None, spec.block_q, depth), lambda bh, i: (bh, i, 0))
    whole = pl.BlockSpec((None, k_len, depth), lambda bh, i: (bh, 0, 0))
    out, r, lse = pl.pallas_call(
        kernel, grid=(batch * heads, q_len // spec.block_q),
        in_specs=[row_spec, whole, whole, pl.BlockSpec((None, k_len), lambda bh, i: (bh, 0))],
        out_specs=[row_spec, row_spec,
                   pl.BlockSpec((None, spec.block_q), lambda bh, i: (bh, i))],
        out_shape=[jax.ShapeDtypeStruct((batch * heads, q_len, depth), F32)] * 2
        + [jax.ShapeDtypeStruct((batch * heads, q_len), F32)],
        interpret=interpret)(_heads_first(query), _heads_first(key), _heads_first(value), valid)
    to_tokens = lambda x: jnp.transpose(x.reshape(batch, heads, q_len, depth), (0, 2, 1, 3))
    return to_tokens(out), to_tokens(r), lse.reshape(batch, heads, q_len)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _pallas_clipped(spec, query, key, value, key_valid, interpret):
    return _pallas_forward(spec, query, key, value, key_valid, interpret)[0].astype(query.dtype)


def _pallas_clipped_fwd(spec, query, key, value, key_valid, interpret):
    out, r, lse = _pallas_forward(spec, query, key, value, key_valid, interpret)
    heads = query.shape[2]
    residuals = (query, key, value, jnp.zeros((heads,), F32), jnp.zeros((2,), jnp.uint32),
                 key_valid, jnp.ones((1, 1, 1, 1), bool), out, r, lse, jnp.zeros_like(lse))
    return out.astype(query.dtype), residuals


def _pallas_clipped_bwd(spec, interpret, residuals, d_out):
    dq, dk, dv = _blocked_bwd(spec, residuals, d_out)[:3]
    return dq, dk, dv, None


_pallas_clipped.defvjp(_pallas_clipped_fwd, _pallas_clipped_bwd)


def pallas_clipped_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                             gamma: float, zeta: float = 1.0, key_mask: jax.Array | None = None,
                             causal: bool = False, block_q: int = 128, block_k: int = 128,
                             interpret: bool = True) -> jax.Array:
    """Clipped-softmax attention with the Pallas forward kernel; gradients of the blocked path.

    Args:
      query: (B, Tq, H, D); key, value: (B, Tk, H, D).
      gamma, zeta: clipped softmax's γ <= 0, ζ >= 1.
      key_mask: (B, Tk) bool, True for real keys; causal: key position <= query position.
      block_q, block_k: tiles (clamped to the lengths; inputs padded to whole tiles).
      interpret: run the kernel in Pallas interpret mode (CPU); False compiles it for the
        accelerator (untested here).
    Returns:
      (B, Tq, H, D) in query's dtype.
    """
    validate_clip_params(gamma, zeta)
    _, q_len, _, depth = query.shape
    k_len = key.shape[1]
    bq, bk = min(block_q, q_len), min(block_k, k_len)
    q_pad, k_pad = _round_up(q_len, bq) - q_len, _round_up(k_len, bk) - k_len
    spec = blk.BlockSpec(softmax="clipped", gamma=float(gamma), zeta=float(zeta),
                         softpick_eps=0.0, causal=causal, dropout_rate=0.0, block_q=bq,
                         block_k=bk, has_mask=False)
    scaled = query / jnp.sqrt(depth).astype(query.dtype)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    key_valid = jnp.ones((1, k_len), bool) if key_mask is None else jnp.asarray(key_mask, bool)
    key_valid = jnp.pad(key_valid, ((0, 0), (0, k_pad)))
    out = _pallas_clipped(spec, pad(scaled, q_pad), pad(key, k_pad), pad(value, k_pad),
                          key_valid, interpret)
    return out[:, :q_len]
