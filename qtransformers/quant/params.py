"""Weight fake quantization: `quantize_params(params, config)`, a pure map over the param tree.

Weights are symmetric signed (paper.md §4): s = max|w| / (2^(b-1) - 1) with the 'minmax'
estimator, or the MSE-optimal symmetric range over `config.num_candidates` fractions of max|w|
with 'mse'. Which parameters: `config.param_is_quantized` on the '/'-joined path (kernels,
embedding tables, LayerNorm scales; never biases, gates or the head by default). Everything
else is returned unchanged (bit-identical values).

Per-channel ranges (`weight_granularity='per_channel'`) are one range per output channel:
- Dense / Conv kernels (..., out): the last axis;
- attention query / key / value kernels (d_model, H, D): each (H, D) column;
- the attention output kernel (H, D, d_model) (path ending 'out/kernel'): the last axis;
- embedding tables (V, d): each row, as the reference's per-row (dim 0) channels;
- 1-D parameters (LayerNorm scale): per tensor (per element would be lossless).

Flax `nn.Partitioned` (any `AxisMetadata`) boxes are kept: the boxed value is replaced.
The whole tree is quantized by one jitted program (QuantConfig is hashable and static); it
also runs inside a caller's jit.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.ops import quant as quant_ops
from qtransformers.quant.config import QuantConfig, param_is_quantized


def path_to_str(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a jax key path (DictKey / GetAttrKey / SequenceKey entries)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def channel_axes(path: str, ndim: int) -> tuple[int, ...]:
    """The axes that index output channels of the parameter at `path` (see module docstring).

    Returns () for per-tensor (1-D parameters).
    """
    if ndim <= 1:
        return ()
    if re.search(r"(^|/)embedding$", path):
        return (0,)
    if ndim == 3 and not re.search(r"(^|/)out/kernel$", path):
        return (1, 2)
    return (ndim - 1,)


def _quantize_per_channel(w: jax.Array, keep: tuple[int, ...], config: QuantConfig) -> jax.Array:
    # Move the channel axes last and flatten to (rows, channels): one range per column.
    reduce = tuple(a for a in range(w.ndim) if a not in keep)
    perm = reduce + keep
    moved = jnp.transpose(w, perm)
    flat = moved.reshape(-1, math.prod(w.shape[a] for a in keep))
    bits = config.weight_bits
    if config.weight_estimator == "mse":
        lo, hi = quant_ops.mse_range_search(flat, bits, True, config.num_candidates, axis=1)
        q = quant_ops.fake_quant(flat, lo, hi, bits, True)
    else:
        q = quant_ops.fake_quant_per_channel(flat, bits, axis=1, symmetric=True)
    inverse = [0] * w.ndim
    for i, a in enumerate(perm):
        inverse[a] = i
    return jnp.transpose(q.reshape(moved.shape), inverse)


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def quantize_weight(w: jax.Array, path: str, config: QuantConfig) -> jax.Array:
    """Fake-quantizes one weight array (any shape) per `config`; returns w's shape and dtype."""
    bits = config.weight_bits
    keep = channel_axes(path, w.ndim) if config.weight_granularity == "per_channel" else ()
    if keep:
        return _quantize_per_channel(w, keep, config)
    if config.weight_estimator == "mse":
        lo, hi = quant_ops.mse_range_search(w, bits, True, config.num_candidates)
    else:
        lo, hi = jnp.min(w), jnp.max(w)
    return quant_ops.fake_quant(w, lo, hi, bits, True)


def _quantize_tree(params: Any, config: QuantConfig) -> Any:
    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        name = path_to_str(path)
        boxed = isinstance(leaf, nn.meta.AxisMetadata)
        value = leaf.unbox() if boxed else leaf
        if not param_is_quantized(name, config) or not _is_float(value):
            return leaf
        q = quantize_weight(jnp.asarray(value), name, config)
        return leaf.replace_boxed(q) if boxed else q

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


# One compiled program for the whole tree (eager per-leaf dispatch compiles every op shape).
_quantize_tree_jit = jax.jit(_quantize_tree, static_argnums=1)


def quantize_params(params: Any, config: QuantConfig) -> Any:
    """Fake-quantizes the weights of a Flax param tree (paper.md §4).

    Args:
      params: the 'params' collection (nested dicts of arrays, possibly `nn.Partitioned`).
      config: QuantConfig (weight_bits, weight_estimator, weight_granularity, include /
        exclude / head patterns).
    Returns:
      A tree of the same structure (boxes kept); quantized leaves hold at most
      2^weight_bits distinct values, all other leaves are bit-identical copies.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    return _quantize_tree_jit(params, config)


def quantized_param_paths(params: Any, config: QuantConfig) -> list[str]:
    """The '/'-joined paths `quantize_params` would quantize, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    return [path_to_str(p) for p, leaf in leaves
            if param_is_quantized(path_to_str(p), config) and _is_float(
                leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf)]
