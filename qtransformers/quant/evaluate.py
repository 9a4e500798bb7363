"""Quantized evaluation: one jitted `(params, qranges, batch) -> metrics` and the PTQ protocol.

    eval_fn = make_quantized_eval_fn(model, "clm", config)
    sums = eval_fn(quantize_params(params, config), qranges, batch)

Ranges are traced arguments: a new estimator, seed or range never recompiles (only new batch
shapes do). Metrics are sums, so batches add up: {'loss_sum', 'count' (weighted tokens or
examples), 'correct'}.

Batches: 'mlm' {input_ids, attention_mask, token_type_ids (optional), targets, weights};
'clm' {input_ids, attention_mask, targets (already shifted: targets[t] = input_ids[t + 1]),
weights}; 'classification' {image (B, H, W, C), label (B,) int, weights or example_weight (optional,
(B,))}.

`evaluate_ptq` follows paper.md §4: the FP metric, then for each PTQ seed a fresh random
calibration subset (`calib_batches_fn(seed)`), weights quantized once, sequential calibration,
quantized evaluation; mean ± std (population std, ddof=0) over seeds.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtransformers.nn.quant_point import QRANGES, QuantContext, quant_context
from qtransformers.quant.calibrate import (Batch, TaskApply, check_batch, discover_points,
                                           calibrate, flatten_points, resolve_task)
from qtransformers.quant.config import QuantConfig
from qtransformers.quant.params import quantize_params

METRIC_KEYS = ("loss_sum", "count", "correct")


def task_metrics(task: str, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Summed loss / count / correct of one batch.

    Args:
      logits: (B, T, V) for 'mlm' / 'clm', (B, C) for 'classification'.
    Returns:
      {'loss_sum', 'count', 'correct'} float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    if task == "classification":
        check_batch(task, batch, ("label",))
        labels = batch["label"]
        weights = batch.get("weights", batch.get("example_weight"))
        weights = jnp.ones(labels.shape[:1], jnp.float32) if weights is None else weights
    else:
        check_batch(task, batch, ("targets", "weights"))
        labels, weights = batch["targets"], batch["weights"]
    weights = weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * weights), "count": jnp.sum(weights),
            "correct": jnp.sum(correct * weights)}


def summarize(task: str, sums: Mapping[str, Any]) -> dict[str, float]:
    """Host: {'loss', 'perplexity' (text tasks), 'accuracy' (%)} from summed metrics."""
    count = max(float(sums["count"]), 1e-12)
    loss = float(sums["loss_sum"]) / count
    out = {"loss": loss, "accuracy": 100.0 * float(sums["correct"]) / count}
    if task != "classification":
        out["perplexity"] = math.exp(min(loss, 700.0))
    return out


def headline_metric(task: str) -> str:
    """'perplexity' for text tasks, 'accuracy' for classification (the paper's columns)."""
    return "accuracy" if task == "classification" else "perplexity"


def validate_qranges(qranges: Any, expected_paths: Sequence[str]) -> None:
    """Raises ValueError listing missing and unexpected QuantPoint paths (and bad entries)."""
    if not isinstance(qranges, Mapping):
        raise ValueError(f"qranges must be a nested dict keyed by QuantPoint paths, got "
                         f"{type(qranges).__name__}")
    points = flatten_points(qranges)
    missing = [p for p in expected_paths if p not in points]
    unexpected = sorted(set(points) - set(expected_paths))
    malformed = sorted(p for p, d in points.items() if set(d) != {"x_min", "x_max"})
    if missing or unexpected or malformed:
        raise ValueError(
            "qranges do not match the model's QuantPoints: "
            f"missing {missing}; unexpected {unexpected}; malformed (need exactly 'x_min' and "
            f"'x_max') {malformed}. Calibrate this model with this config "
            "(quant.calibrate) to get matching ranges.")


def make_eval_fn(model: nn.Module, task: str | None = None) -> Callable[[Any, Batch], dict]:
    """Jitted full-precision `fn(params, batch) -> {'loss_sum', 'count', 'correct'}`."""
    apply_fn = TaskApply(model, resolve_task(model, task))

    @jax.jit
    def fn(params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits = apply_fn({"params": params}, batch, [])[0]
        return task_metrics(apply_fn.task, logits, batch)

    return fn


def make_quantized_eval_fn(model: nn.Module, task: str | None, config: QuantConfig, *,
                           validate: bool = True,
                           max_traces: int | None = None) -> Callable[[Any, Any, Batch], dict]:
    """`fn(params, qranges, batch) -> {'loss_sum', 'count', 'correct'}` with fake-quantized acts.

    params should already be weight-quantized (quantize_params). qranges: the calibrated
    collection (None / {} for act_granularity='per_token'). Activation bits and granularity come
    from config (static); the ranges are traced, so changing them never recompiles.

    Args:
      validate: check qranges against the model's QuantPoints on the host before each call
        (points discovered once, on the first batch).
      max_traces: if set, wrap the traced function in chex.assert_max_traces(n=max_traces).
    """
    apply_fn = TaskApply(model, resolve_task(model, task))
    ctx = QuantContext(bits=config.act_bits, granularity=config.act_granularity)
    dynamic = config.act_granularity == "per_token"

    def traced(params: Any, qranges: Any, batch: Batch) -> dict[str, jax.Array]:
        variables = {"params": params}
        if qranges:
            variables[QRANGES] = qranges
        with quant_context(ctx):
            logits = apply_fn(variables, batch, [])[0]
        return task_metrics(apply_fn.task, logits, batch)

    if max_traces is not None:
        traced = chex.assert_max_traces(traced, n=max_traces)
    jitted = jax.jit(traced)
    expected: list[list[str]] = []

    def fn(params: Any, qranges: Any, batch: Batch) -> dict[str, jax.Array]:
        if validate and not dynamic:
            if not expected:
                expected.append(discover_points(apply_fn, params, batch))
            validate_qranges(qranges, expected[0])
        return jitted(params, None if dynamic else qranges, batch)

    fn.jitted = jitted  # type: ignore[attr-defined]
    return fn


def sum_metrics(eval_fn: Callable[..., dict], args: tuple, batches: Iterable[Batch]) -> dict:
    """Adds eval_fn(*args, batch) over batches on the host; raises on zero batches."""
    total = None
    for batch in batches:
        sums = jax.device_get(eval_fn(*args, batch))
        total = sums if total is None else {k: total[k] + sums[k] for k in METRIC_KEYS}
    if total is None:
        raise ValueError("evaluation got zero batches; pass at least one eval batch")
    return {k: float(v) for k, v in total.items()}


def random_subset_fn(pool: Sequence[Batch], num_batches: int) -> Callable[[int], list[Batch]]:
    """seed -> `num_batches` distinct batches of `pool` drawn at random (numpy, by seed)."""
    if not pool:
        raise ValueError("the calibration pool is empty; pass at least one batch")
    n = min(num_batches, len(pool))

    def draw(seed: int) -> list[Batch]:
        idx = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
        return [pool[i] for i in idx]

    return draw


def evaluate_ptq(model: nn.Module, params: Any, eval_batches: Sequence[Batch],
                 calib_batches_fn: Callable[[int], Iterable[Batch]], config: QuantConfig,
                 seeds: Sequence[int] | None = None, *, task: str | None = None,
                 sequential: bool = True) -> dict[str, Any]:
    """FP metric and W{b}A{b} mean ± std over PTQ seeds (paper.md §4, §7).

    Args:
      eval_batches: a re-iterable sequence of evaluation batches.
      calib_batches_fn: seed -> iterable of calibration batches (a random subset per seed).
      seeds: PTQ seeds (default config.seeds); per_token activations run once (no calibration).
    Returns:
      {'task', 'metric', 'fp': summarize(...), 'quantized': {'per_seed': [{'seed', 'loss',
       'perplexity' / 'accuracy'}], 'mean', 'std'}, 'qranges': {seed: qranges}, 'config'}.
    """
    task = resolve_task(model, task)
    seeds = tuple(config.seeds if seeds is None else seeds)
    if not seeds:
        raise ValueError("seeds must name at least one PTQ seed")
    eval_batches = list(eval_batches)
    fp = summarize(task, sum_metrics(make_eval_fn(model, task), (params,), eval_batches))
    qparams = quantize_params(params, config)
    qeval = make_quantized_eval_fn(model, task, config)
    metric = headline_metric(task)
    per_seed, all_ranges = [], {}
    for seed in seeds[:1] if config.act_granularity == "per_token" else seeds:
        qranges = None
        if config.act_granularity != "per_token":
            qranges = calibrate(model, qparams, calib_batches_fn(seed), config, task=task,
                                sequential=sequential)
            all_ranges[seed] = qranges
        result = summarize(task, sum_metrics(qeval, (qparams, qranges), eval_batches))
        per_seed.append({"seed": seed, **result})
    values = np.asarray([r[metric] for r in per_seed], np.float64)
    return {"task": task, "metric": metric, "fp": fp,
            "quantized": {"per_seed": per_seed, "mean": float(values.mean()),
                          "std": float(values.std())},
            "qranges": all_ranges, "config": config.to_dict()}
