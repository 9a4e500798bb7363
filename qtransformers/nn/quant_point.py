"""QuantPoint: a named marker at every activation site the paper quantizes (paper.md §4).

What a QuantPoint does is decided by the variable collections of the `apply` call and by a
static `QuantContext` entered *inside the traced function* with `quant_context(...)`:

- `qranges` collection holding {'x_min': (), 'x_max': ()} at this point's path: fake-quantize
  with that static range (asymmetric, `bits` from the context). Ranges are traced arrays, so
  new ranges never recompile; bits and granularity are static.
- context granularity 'per_token': dynamic per-token fake quantization (no ranges needed): the
  range of each token is its min / max over all its features ((B, T, ...) tensors), or over the
  key axis for the attention scores / probabilities ((B, H, T, T), one range per query row).
- mutable `qstats` collection (calibration): sow small per-batch reductions from the context's
  `observer` (min / max by default; quantiles or an MSE loss vector, see quant.calibrate) plus
  'finite' (bool: no NaN / Inf among the observed values) — never whole tensors. With
  `sequential=True` the observer folds those statistics into the running estimate read from the
  `qstate` collection (the estimator state before this batch) and the point fake-quantizes with
  the updated range, so later points see quantized inputs (the reference's calibration).
- mutable `outliers` collection: sow per-sample 'inf_norm' (B,) and non-excess 'kurtosis' (B,)
  and per-channel 'channel_max' max|x| (d,), of the point's output, at tracked paths (context
  `outlier_sites`, regexes; None tracks every point).
- otherwise the identity. Nothing is sown during `init`.

Optional points (`optional_point(name, x)` inside a compact method) exist only when the context
names them in `optional_points`; otherwise no module is created (x is returned), so they are
not discovered and need no range. They
mark sites that only some quantization layouts have (quant.config.optional_points):
`EMBEDDINGS_WORD_TYPE` (BERT's first embedding sum, word + token type, in the reference's
two-step layout) and `LOGITS` (the LM / MLM head output, quantized in the reference's OPT
quant_setup='all').

A tied output head multiplies by the embedding table; `fp_head_table` returns the full-precision
copy that quant.params stores at the top-level param `FP_HEAD_TABLE` when the head is kept in
full precision (else None: the head uses the embedding's own, possibly quantized, table).

Padding: `quant_context(..., token_mask=mask)` with a (B, T) bool mask (True = real token)
excludes padded tokens from every statistic (calibration and outliers) but not from
quantization. Tensors of layout 'tokens' are (B, T, ...); layout 'attention' tensors are
(B, H, T, T) and keep an entry when both its query and key tokens are real.

    with quant_context(QuantContext(bits=8), token_mask=batch["attention_mask"]):
        logits = model.apply({"params": p, "qranges": qranges}, ...)
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Any, Iterator, Mapping, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.ops import metrics as metric_ops
from qtransformers.ops import quant as quant_ops

QRANGES = "qranges"
QSTATE = "qstate"
QSTATS = "qstats"
OUTLIERS = "outliers"
GRANULARITIES = ("per_tensor", "per_token")
LAYOUTS = ("tokens", "attention")
# QuantPoints with these names hold (B, H, T_query, T_key) attention tensors.
ATTENTION_LAYOUT_NAMES = ("scores", "probs")
# Names of the optional QuantPoints (see the module docstring).
EMBEDDINGS_WORD_TYPE = "embeddings_word_type"
LOGITS = "logits"
OPTIONAL_POINTS = (EMBEDDINGS_WORD_TYPE, LOGITS)
# Top-level param holding the full-precision table of a tied head (quant.params writes it).
FP_HEAD_TABLE = "fp_head_table"


class Observer(Protocol):
    """Calibration statistics of one estimator, on device (implemented in quant.calibrate)."""

    def stats(self, x: jax.Array, where: jax.Array | None,
              state: Mapping[str, jax.Array] | None) -> dict[str, jax.Array]:
        """Small per-batch reductions of x (where: bool of x's shape, or None)."""

    def fold(self, state: Mapping[str, jax.Array] | None,
             stats: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """The range (x_min, x_max) after folding this batch's stats into `state`."""


@dataclasses.dataclass(frozen=True)
class QuantContext:
    """Static settings of every QuantPoint during one traced apply.

    Attributes:
      bits: activation bit width (asymmetric grid [0, 2^bits - 1]).
      granularity: 'per_tensor' (static ranges from `qranges`) or 'per_token' (dynamic).
      observer: calibration statistics (None: min / max); hashable, static.
      sequential: during calibration, fake-quantize with the range folded from this batch.
      outlier_sites: regexes (re.search on the '/'-joined point path) of the points that sow
        outlier metrics; None = all points.
      optional_points: names (of OPTIONAL_POINTS) of the optional QuantPoints that are active.
    """

    bits: int = 8
    granularity: str = "per_tensor"
    observer: Any = None
    sequential: bool = False
    outlier_sites: tuple[str, ...] | None = None
    optional_points: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        quant_ops.check_bits(self.bits, "QuantContext.bits")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantContext.granularity must be one of {GRANULARITIES}, got "
                             f"{self.granularity!r}")
        if self.outlier_sites is not None and not isinstance(self.outlier_sites, tuple):
            raise ValueError("QuantContext.outlier_sites must be a tuple of regexes or None, "
                             f"got {self.outlier_sites!r}")
        if not isinstance(self.optional_points, tuple) or not set(self.optional_points) <= set(
                OPTIONAL_POINTS):
            raise ValueError(f"QuantContext.optional_points must be a tuple of names among "
                             f"{OPTIONAL_POINTS}, got {self.optional_points!r}")


_DEFAULT = QuantContext()
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("qtransformers_quant_context",
                                                          default=(_DEFAULT, None, None))


@contextlib.contextmanager
def quant_context(context: QuantContext | None = None, token_mask: jax.Array | None = None,
                  recorder: list[str] | None = None) -> Iterator[None]:
    """Sets the QuantPoint settings for applies traced inside this block.

    Enter it inside the function you jit: the settings are read at trace time.

    Args:
      context: static settings (None: defaults, i.e. identity unless collections say otherwise).
      token_mask: optional (B, T) mask, True / 1 for real tokens, excluded from statistics
        when False.
      recorder: optional list; every point appends its path when traced (discovery, in call
        order).
    """
    token = _CONTEXT.set((context or _DEFAULT, token_mask, recorder))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> QuantContext:
    """The QuantContext in effect (defaults outside `quant_context`)."""
    return _CONTEXT.get()[0]


def point_path(module: nn.Module) -> str:
    """'/'-joined path of a bound module, e.g. 'encoder/layers_0/attention/scores'."""
    return "/".join(str(p) for p in module.path)


def _statistics_mask(x: jax.Array, token_mask: jax.Array | None, layout: str,
                     path: str) -> jax.Array | None:
    """A bool mask of x's shape (True = include in statistics), or None for all."""
    if token_mask is None:
        return None
    mask = jnp.asarray(token_mask).astype(bool)
    if layout == "attention":
        if x.ndim != 4 or x.shape[:1] + x.shape[2:] != mask.shape[:1] + mask.shape[1:] * 2:
            raise ValueError(f"QuantPoint {path!r}: token_mask of shape {mask.shape} does not fit "
                             f"attention tensor {x.shape} (expected (B, H, T, T))")
        full = mask[:, None, :, None] & mask[:, None, None, :]
    else:
        if x.ndim < 2 or x.shape[:2] != mask.shape:
            raise ValueError(f"QuantPoint {path!r}: token_mask of shape {mask.shape} must equal "
                             f"the leading (B, T) dims of the tensor, got {x.shape}")
        full = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    return jnp.broadcast_to(full, x.shape)


def masked_min_max(x: jax.Array, where: jax.Array | None) -> dict[str, jax.Array]:
    """{'min': (), 'max': ()} of x over the entries where `where` (all when None), float32+."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if where is None:
        return {"min": jnp.min(xf), "max": jnp.max(xf)}
    return {"min": jnp.min(jnp.where(where, xf, jnp.inf)),
            "max": jnp.max(jnp.where(where, xf, -jnp.inf))}


def _dynamic_per_token(x: jax.Array, bits: int, layout: str) -> jax.Array:
    if layout == "attention" or x.ndim <= 2:
        return quant_ops.fake_quant_per_token(x, bits, symmetric=False)
    flat = x.reshape(x.shape[:2] + (-1,))
    return quant_ops.fake_quant_per_token(flat, bits, symmetric=False).reshape(x.shape)


def _sow(module: nn.Module, col: str, name: str, value: Any) -> None:
    # Keep the value itself (last call wins) instead of Flax's default tuple of calls.
    module.sow(col, name, value, init_fn=lambda: None, reduce_fn=lambda _, new: new)


def _sow_outliers(module: nn.Module, y: jax.Array, where_tokens: jax.Array | None,
                  layout: str) -> None:
    if y.ndim < 2:
        return
    if layout == "attention":
        mask = None if where_tokens is None else where_tokens  # full (B, H, T, T)
        flat = y
    else:
        flat = y.reshape(y.shape[:2] + (-1,)) if y.ndim > 3 else y
        mask = None if where_tokens is None else where_tokens.reshape(flat.shape)[..., 0]
    _sow(module, OUTLIERS, "inf_norm", metric_ops.inf_norm_per_sample(flat, mask))
    _sow(module, OUTLIERS, "kurtosis", metric_ops.kurtosis_per_sample(flat, mask))
    _sow(module, OUTLIERS, "channel_max", metric_ops.per_channel_max_abs(flat, mask))


def apply_point(module: nn.Module, x: jax.Array, layout: str = "tokens") -> jax.Array:
    """The QuantPoint behaviour for the bound `module` on its activation x (any shape).

    Shared by `QuantPoint` and the `nn.intercept_methods` interceptor of quant.intercept.
    Returns x, its fake-quantized version, per the module docstring.
    """
    if module.is_initializing():
        return x
    ctx, token_mask, recorder = _CONTEXT.get()
    path = point_path(module)
    if recorder is not None:
        recorder.append(path)
    needs_mask = module.is_mutable_collection(QSTATS) or module.is_mutable_collection(OUTLIERS)
    where = _statistics_mask(x, token_mask, layout, path) if needs_mask else None
    y = x
    if module.is_mutable_collection(QSTATS):
        state = None
        if module.has_variable(QSTATE, "count"):
            state = module.variables[QSTATE]
        if ctx.observer is None:
            stats = masked_min_max(x, where)
        else:
            stats = dict(ctx.observer.stats(x, where, state))
        finite = jnp.isfinite(x) if where is None else jnp.isfinite(x) | ~where
        stats["finite"] = jnp.all(finite)
        for name, value in stats.items():
            _sow(module, QSTATS, name, value)
        if ctx.sequential:
            if ctx.observer is None:
                lo, hi = stats["min"], stats["max"]
            else:
                lo, hi = ctx.observer.fold(state, stats)
            y = quant_ops.fake_quant(x, lo, hi, ctx.bits, False)
    elif ctx.granularity == "per_token":
        y = _dynamic_per_token(x, ctx.bits, layout)
    elif module.has_variable(QRANGES, "x_min"):
        ranges = module.variables[QRANGES]
        if "x_max" not in ranges:
            raise ValueError(f"qranges at {path!r} must hold 'x_min' and 'x_max', got "
                             f"{sorted(ranges)}")
        y = quant_ops.fake_quant(x, ranges["x_min"], ranges["x_max"], ctx.bits, False)
    if module.is_mutable_collection(OUTLIERS) and (
            ctx.outlier_sites is None or any(re.search(p, path) for p in ctx.outlier_sites)):
        _sow_outliers(module, y, where, layout)
    return y


def active_attention_points(module: nn.Module) -> list[str]:
    """Names in ATTENTION_LAYOUT_NAMES whose QuantPoint under `module` would act in this apply.

    For attention paths that never build the (B, H, T, T) tensors: a point acts when it would
    calibrate (mutable qstats), quantize (per-token context, or qranges at its path) or sow
    outlier metrics (mutable outliers at a tracked path).
    """
    if module.is_initializing():
        return []
    ctx = current_context()
    base = point_path(module)
    ranges = module.variables.get(QRANGES, {})
    active = []
    for name in ATTENTION_LAYOUT_NAMES:
        path = f"{base}/{name}"
        tracked = module.is_mutable_collection(OUTLIERS) and (
            ctx.outlier_sites is None or any(re.search(p, path) for p in ctx.outlier_sites))
        if (module.is_mutable_collection(QSTATS) or ctx.granularity == "per_token"
                or name in ranges or tracked):
            active.append(name)
    return active


class QuantPoint(nn.Module):
    """Named activation site (paper.md §4); the identity unless quantization is requested.

    Attributes:
      layout: 'tokens' ((B, T, ...)) or 'attention' ((B, H, T, T)); None infers 'attention'
        for the names 'scores' and 'probs', else 'tokens'. Only used for token masks and
        dynamic per-token ranges.
    Call: x any shape -> same shape and dtype (see the module docstring for the modes).
    """

    layout: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layout = self.layout
        if layout is None:
            layout = "attention" if self.name in ATTENTION_LAYOUT_NAMES else "tokens"
        if layout not in LAYOUTS:
            raise ValueError(f"QuantPoint.layout must be one of {LAYOUTS} or None, got "
                             f"{self.layout!r}")
        return apply_point(self, x, layout)



def optional_point(name: str, x: jax.Array) -> jax.Array:
    """QuantPoint(name=name)(x) when the context activates `name` (OPTIONAL_POINTS), else x.

    Call inside a compact method: the point becomes a child of the calling module.
    """
    if name not in OPTIONAL_POINTS:
        raise ValueError(f"optional point name must be one of {OPTIONAL_POINTS}, got {name!r}")
    if name in current_context().optional_points:
        return QuantPoint(name=name)(x)
    return x


def fp_head_table(module: nn.Module) -> jax.Array | None:
    """The full-precision (V, d) table for a tied head, or None (use the embedding's own).

    module: the top-level model module; its params hold FP_HEAD_TABLE when quant.params kept
    the head in full precision (config head='fp').
    """
    if module.has_variable("params", FP_HEAD_TABLE):
        return jnp.asarray(nn.meta.unbox(module.get_variable("params", FP_HEAD_TABLE)))
    return None
