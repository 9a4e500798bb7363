"""Weight fake quantization: `quantize_params(params, config)`, a pure map over the param tree.

Weights are symmetric signed (paper.md §4): s = max|w| / (2^(b-1) - 1) with the 'minmax'
estimator, or the MSE-optimal symmetric range over `config.num_candidates` fractions of
max|w| + config.weight_mse_margin with 'mse'. With `config.unsigned_weights` a tensor with no
negative entry uses the unsigned grid [0, 2^b - 1] instead: s = max / (2^b - 1), and the MSE
candidates are (0, (max + margin) i / N) (the reference's one-sided search). Which parameters:
`config.param_is_quantized` on the '/'-joined path (kernels, embedding tables, LayerNorm
scales; never biases, gates or the head by default). Everything else is returned unchanged
(bit-identical values).

Tied head in full precision (`config.head == 'fp'`): the tree gains one top-level param,
nn.quant_point.FP_HEAD_TABLE, an unquantized copy of the table the head is tied to (BERT's
'word_embeddings/embedding', OPT's 'embed_tokens/embedding'); the models' heads multiply by it.

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
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.models.bert import TIED_HEAD_EMBEDDING as BERT_TIED_HEAD
from qtransformers.models.opt import TIED_HEAD_EMBEDDING as OPT_TIED_HEAD
from qtransformers.nn.quant_point import FP_HEAD_TABLE
from qtransformers.ops import quant as quant_ops
from qtransformers.pytree import path_to_str
from qtransformers.quant.config import QuantConfig, param_is_quantized


TIED_HEAD_EMBEDDINGS = (BERT_TIED_HEAD, OPT_TIED_HEAD)
# The QuantConfig fields quantize_params reads.
WEIGHT_FIELDS = ("weight_bits", "weight_estimator", "num_candidates", "weight_granularity",
                 "include", "exclude", "head_patterns", "quantize_head", "head",
                 "unsigned_weights", "weight_mse_margin")


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


def _quantize_per_channel(w: jax.Array, keep: tuple[int, ...], config: QuantConfig,
                          unsigned: bool = False) -> jax.Array:
    # Move the channel axes last and flatten to (rows, channels): one range per column.
    reduce = tuple(a for a in range(w.ndim) if a not in keep)
    perm = reduce + keep
    moved = jnp.transpose(w, perm)
    flat = moved.reshape(-1, math.prod(w.shape[a] for a in keep))
    bits, symmetric = config.weight_bits, not unsigned
    if config.weight_estimator == "mse":
        lo, hi = quant_ops.mse_range_search(flat, bits, symmetric, config.num_candidates, axis=1,
                                            margin=config.weight_mse_margin)
        q = quant_ops.fake_quant(flat, lo, hi, bits, symmetric)
    else:
        q = quant_ops.fake_quant_per_channel(flat, bits, axis=1, symmetric=symmetric)
    inverse = [0] * w.ndim
    for i, a in enumerate(perm):
        inverse[a] = i
    return jnp.transpose(q.reshape(moved.shape), inverse)


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _quantize_on_grid(w: jax.Array, path: str, config: QuantConfig, unsigned: bool) -> jax.Array:
    # unsigned: w has no negative entry, so the asymmetric grid [0, 2^b - 1] with the range
    # widened to include 0 is exactly the unsigned grid (zero point 0, s = max / (2^b - 1)).
    bits, symmetric = config.weight_bits, not unsigned
    keep = channel_axes(path, w.ndim) if config.weight_granularity == "per_channel" else ()
    if keep:
        return _quantize_per_channel(w, keep, config, unsigned)
    if config.weight_estimator == "mse":
        lo, hi = quant_ops.mse_range_search(w, bits, symmetric, config.num_candidates,
                                            margin=config.weight_mse_margin)
    else:
        lo, hi = jnp.min(w), jnp.max(w)
    return quant_ops.fake_quant(w, lo, hi, bits, symmetric)


def quantize_weight(w: jax.Array, path: str, config: QuantConfig) -> jax.Array:
    """Fake-quantizes one weight array (any shape) per `config`; returns w's shape and dtype.

    With config.unsigned_weights the grid is chosen on device: unsigned when min(w) >= 0 (over
    the whole tensor, also per channel, as the reference's `x_min.min() < 0` test), else signed.
    """
    if not config.unsigned_weights:
        return _quantize_on_grid(w, path, config, unsigned=False)
    return jax.lax.cond(jnp.min(w) >= 0,
                        lambda v: _quantize_on_grid(v, path, config, unsigned=True),
                        lambda v: _quantize_on_grid(v, path, config, unsigned=False), w)


def _tied_head_table(params: Any) -> Any:
    """The (unquantized) leaf a tied head multiplies by, or None (no tied table at top level)."""
    if not isinstance(params, Mapping):
        return None
    for path in TIED_HEAD_EMBEDDINGS:
        node: Any = params
        for key in path.split("/"):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def _quantize_tree(params: Any, config: QuantConfig) -> Any:
    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        name = path_to_str(path)
        boxed = isinstance(leaf, nn.meta.AxisMetadata)
        value = leaf.unbox() if boxed else leaf
        if not param_is_quantized(name, config) or not _is_float(value):
            return leaf
        q = quantize_weight(jnp.asarray(value), name, config)
        return leaf.replace_boxed(q) if boxed else q

    out = jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    table = _tied_head_table(params) if config.head == "fp" else None
    if table is not None and isinstance(out, Mapping) and FP_HEAD_TABLE not in out:
        out = {**out, FP_HEAD_TABLE: jnp.asarray(nn.meta.unbox(table))}
    return out


def weight_settings(config: QuantConfig) -> QuantConfig:
    """config with every field weight quantization ignores at its default, so configs that
    differ only in activation / calibration settings share one compiled program."""
    return QuantConfig(**{f: getattr(config, f) for f in WEIGHT_FIELDS})


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
      2^weight_bits distinct values, all other leaves are bit-identical copies. With
      config.head == 'fp' and a tied table present, plus the top-level FP_HEAD_TABLE copy.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    return _quantize_tree_jit(params, weight_settings(config))


def quantized_param_paths(params: Any, config: QuantConfig) -> list[str]:
    """The '/'-joined paths `quantize_params` would quantize, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    return [path_to_str(p) for p, leaf in leaves
            if param_is_quantized(path_to_str(p), config) and _is_float(
                leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf)]
