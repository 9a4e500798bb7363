"""Outlier metrics of the tensors the paper tracks (paper.md §5), FP or quantized.

Definitions: kurtosis is NON-excess (a Gaussian gives 3) of each sample's flattened (T * d)
tensor, E[(x - mu)^4] / (std_unbiased^4 + 1e-6); inf-norm is each sample's max |x|. Both are
averaged over the evaluation samples (padded tokens excluded when the batch has an
attention_mask; the reference includes them, which only matters for padded data).

Tracked tensors (QuantPoint paths):
- bert: each layer's FFN output 'mlp/output_output' and output LayerNorm 'mlp_ln/output'
  (inf-norm and kurtosis), and the residual sum before it, 'mlp_residual' (inf-norm only).
- opt / vit: each layer's output 'mlp_residual', fc2 'mlp/output_output', both LayerNorm
  outputs, the attention output projection 'attention/out_output', and the final LayerNorm.
Aggregates: 'avg_kurtosis' = mean over tensors carrying kurtosis; 'max_inf_norm' = the paper's
table number (bert: max over all tracked tensors; opt / vit: max over the layer outputs, as the
reference's max_layer_inf_norm); 'max_inf_norm_all' = max over every tracked tensor.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np

from qtransformers.models.tasks import TrackedSites, families, get_task
from qtransformers.nn.quant_point import OUTLIERS, QRANGES, QuantContext, quant_context
from qtransformers.ops.metrics import aggregate_outlier_metrics
from qtransformers.quant.calibrate import TaskApply, flatten_points, no_token_mask, token_mask_of
from qtransformers.quant.config import QuantConfig, optional_points

DEFINITION = ("kurtosis: non-excess (Gaussian = 3), per sample over the flattened (T*d) tensor, "
              "E[(x-mu)^4] / (std_unbiased^4 + 1e-6), averaged over samples; inf-norm: per-sample "
              "max|x| averaged over samples")


# The tracked tensors of each family: a fact of its Task (qtransformers.models.tasks).
TRACKED: dict[str, TrackedSites] = {name: get_task(name).outlier_sites for name in families()}


def tracked_sites(family: str) -> TrackedSites:
    """The tracked tensors of a family ('bert' | 'opt' | 'vit' | any registered Task)."""
    try:
        return get_task(family).outlier_sites
    except ValueError as err:
        raise ValueError(f"family must be one of {families()}, got {family!r}") from err


def _family(model: nn.Module, family: str | None) -> str:
    if family is None:
        family = getattr(getattr(model, "config", None), "family", None)
    tracked_sites(family)  # validates
    return family


def _outlier_collection(apply_fn: TaskApply, ctx: QuantContext, mask_fn: Callable, params: Any,
                        qranges: Any, batch: Mapping[str, Any]) -> Any:
    variables = {"params": params}
    if qranges:
        variables[QRANGES] = qranges
    with quant_context(ctx, mask_fn(batch)):
        _, cols = apply_fn(variables, batch, [OUTLIERS])
    return cols.get(OUTLIERS, {})


_outlier_step = functools.partial(jax.jit, static_argnums=(0, 1, 2))(_outlier_collection)


@functools.lru_cache(maxsize=8)
def _outlier_step_to(out_sharding: Any) -> Callable[..., Any]:
    """_outlier_step with its outputs placed on `out_sharding` (replicated: multi-host
    readable)."""
    return jax.jit(_outlier_collection, static_argnums=(0, 1, 2), out_shardings=out_sharding)


class OutlierAccumulator:
    """Host-side running sums of per-sample metrics and per-channel maxima per tensor."""

    def __init__(self, sites: TrackedSites):
        self.sites = sites
        self.sums: dict[str, dict[str, float]] = {}
        self.channel_max: dict[str, np.ndarray] = {}
        self.num_samples = 0

    def add(self, outliers: Mapping[str, Any], valid: Any = None) -> None:
        """Adds one batch's sown outlier collection (device_get'ed); `valid` (B,) 0 / 1 leaves
        padding rows out of the means (their channel maxima still count)."""
        points = flatten_points(outliers)
        for path, d in points.items():
            s = self.sums.setdefault(path, {"inf_norm": 0.0, "kurtosis": 0.0, "n": 0})
            w = (np.ones(np.shape(d["inf_norm"])[0]) if valid is None
                 else np.asarray(valid, np.float64))
            s["inf_norm"] += float(np.sum(np.asarray(d["inf_norm"], np.float64) * w))
            s["kurtosis"] += float(np.sum(np.asarray(d["kurtosis"], np.float64) * w))
            s["n"] += float(w.sum())
            cm = np.asarray(d["channel_max"], np.float32)
            old = self.channel_max.get(path)
            self.channel_max[path] = cm if old is None else np.maximum(old, cm)
        if points:
            self.num_samples += (int(np.shape(next(iter(points.values()))["inf_norm"])[0])
                                 if valid is None else int(np.sum(valid)))

    def result(self, top_k: int = 5) -> dict[str, Any]:
        """Per-tensor means, per-layer tables, channel views and the paper's aggregates."""
        if not self.sums:
            raise ValueError("no outlier statistics collected: zero batches, or no tracked "
                             "QuantPoint matched the model")
        per_tensor: dict[str, dict[str, float]] = {}
        for path in sorted(self.sums, key=_layer_sort_key):
            s = self.sums[path]
            n = max(s["n"], 1e-12)
            entry = {"inf_norm": s["inf_norm"] / n}
            if any(re.search(p, path) for p in self.sites.full):
                entry["kurtosis"] = s["kurtosis"] / n
                entry["excess_kurtosis"] = entry["kurtosis"] - 3.0
            per_tensor[path] = entry
        agg = aggregate_outlier_metrics(per_tensor)
        layers = {p: v for p, v in per_tensor.items() if re.search(self.sites.layer_outputs, p)}
        layer_inf = max((v["inf_norm"] for v in layers.values()), default=float("nan"))
        kurts = [v["kurtosis"] for v in per_tensor.values() if "kurtosis" in v]
        worst = agg["max_inf_norm_tensor"]
        channels = {p: {"top_channels": [int(i) for i in np.argsort(-c)[:top_k]],
                        "top_values": [float(c[i]) for i in np.argsort(-c)[:top_k]],
                        "median": float(np.median(c))} for p, c in self.channel_max.items()}
        return {
            "definition": DEFINITION,
            "num_samples": self.num_samples,
            "max_inf_norm": layer_inf if self.sites.table_inf_norm == "layers"
            else agg["max_inf_norm"],
            "max_inf_norm_all": agg["max_inf_norm"],
            "max_inf_norm_tensor": worst,
            "max_layer_inf_norm": layer_inf,
            "avg_kurtosis": agg["avg_kurtosis"],
            "avg_excess_kurtosis": agg["avg_kurtosis"] - 3.0,
            "max_kurtosis": max(kurts, default=float("nan")),
            "per_tensor": per_tensor,
            "per_layer": per_layer_table(per_tensor),
            "channels": channels,
            "channel_max": {p: c.tolist() for p, c in self.channel_max.items()},
        }


def _layer_sort_key(path: str) -> tuple[int, str]:
    m = re.search(r"layers_(\d+)/", path)
    return (int(m.group(1)) if m else 10**9, path)


def per_layer_table(per_tensor: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """{'0': {'mlp/output_output': {...}, ...}, ..., 'other': {'final_ln/output': {...}}}."""
    table: dict[str, dict[str, Any]] = {}
    for path, entry in per_tensor.items():
        m = re.search(r"layers_(\d+)/(.*)$", path)
        layer, site = (m.group(1), m.group(2)) if m else ("other", path)
        table.setdefault(layer, {})[site] = dict(entry)
    return table


def collect_outlier_metrics(model: nn.Module, params: Any, batches: Iterable[Mapping[str, Any]],
                            family: str | None = None, qranges: Any = None,
                            config: QuantConfig | None = None, *, task: Any = None,
                            exclude_padding: bool = True,
                            valid_rows: Callable[[Mapping[str, Any]], Any] | None = None,
                            out_sharding: Any = None) -> dict[str, Any]:
    """Dataset-averaged outlier metrics of the tracked tensors (see module docstring).

    Args:
      model, params: one of our models (BERT / OPT / ViT) and its params.
      batches: evaluation batches of the model's task.
      family: 'bert' | 'opt' | 'vit' (None: model.config.family).
      task: the Task (or its name) that calls the model (default: the family's).
      valid_rows: batch -> (B,) 0 / 1 of the rows that count (padded eval batches), or None.
      out_sharding: where the per-sample values land (the trainer: replicated), or None.
      qranges: with calibrated ranges, the metrics of the quantized model (activations
        fake-quantized; pass quantized params too); {} with config.act_granularity='per_token'
        for dynamic ranges. config gives act_bits / granularity (default QuantConfig()).
    Returns:
      See OutlierAccumulator.result: 'max_inf_norm', 'avg_kurtosis', 'per_tensor',
      'per_layer', 'channels' (top channels by max|x|), 'channel_max' ((d,) lists), ...
    """
    family = _family(model, family)
    sites = tracked_sites(family)
    config = config or QuantConfig()
    quantized = qranges is not None  # {} with act_granularity='per_token': dynamic ranges
    ctx = QuantContext(bits=config.act_bits,
                       granularity=config.act_granularity if quantized else "per_tensor",
                       outlier_sites=sites.all,
                       optional_points=optional_points(config) if quantized else ())
    apply_fn = TaskApply(model, task or get_task(family))
    mask_fn = token_mask_of if exclude_padding else no_token_mask
    acc = OutlierAccumulator(sites)
    step = _outlier_step if out_sharding is None else _outlier_step_to(out_sharding)
    if valid_rows is not None and out_sharding is not None:
        valid_rows = jax.jit(valid_rows, out_shardings=out_sharding)
    for batch in batches:
        acc.add(jax.device_get(step(apply_fn, ctx, mask_fn, params, qranges or None, batch)),
                None if valid_rows is None else jax.device_get(valid_rows(batch)))
    return acc.result()


def per_sample_outliers(model: nn.Module, family: str, params: Any,
                        batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The trainer's OutlierEvalFn signature: per-sample values of every tracked tensor.

    Returns:
      {'inf_norm/<path>': (B,), 'kurtosis/<path>': (B,)} float32 device arrays (kurtosis only
      for tensors that carry it, non-excess); padded tokens excluded.
    """
    sites = tracked_sites(family)
    ctx = QuantContext(outlier_sites=sites.all)
    apply_fn = TaskApply(model, get_task(family))
    points = flatten_points(_outlier_step(apply_fn, ctx, token_mask_of, params, None, batch))
    out = {}
    for path, d in points.items():
        out[f"inf_norm/{path}"] = d["inf_norm"]
        if any(re.search(p, path) for p in sites.full):
            out[f"kurtosis/{path}"] = d["kurtosis"]
    return out


def outlier_eval_fn(model: nn.Module, params: Any, batch: Mapping[str, Any],
                    family: str | None = None) -> dict[str, float]:
    """One batch's outlier summary for periodic logging during training (jitted, cached).

    Returns:
      {'max_inf_norm', 'max_inf_norm_all', 'avg_kurtosis', 'max_kurtosis',
       'inf_norm/<path>', 'kurtosis/<path>'} as Python floats (non-excess kurtosis).
    """
    family = _family(model, family)
    result = collect_outlier_metrics(model, params, [batch], family)
    out = {k: float(result[k]) for k in ("max_inf_norm", "max_inf_norm_all", "avg_kurtosis",
                                         "max_kurtosis")}
    for path, entry in result["per_tensor"].items():
        out[f"inf_norm/{path}"] = entry["inf_norm"]
        if "kurtosis" in entry:
            out[f"kurtosis/{path}"] = entry["kurtosis"]
    return out
