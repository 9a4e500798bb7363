"""Quantized evaluation: one jitted `(params, qranges, batch) -> metrics` and the PTQ protocol.

    eval_fn = make_quantized_eval_fn(model, "clm", config)
    sums = eval_fn(quantize_params(params, config), qranges, batch)

Ranges are traced arguments: a new estimator, seed or range never recompiles (only new batch
shapes do). Metrics are sums, so batches add up: {'loss_sum', 'weight_sum' (weighted tokens or
examples), 'correct_sum'} (the Task's convention, qtransformers.models.tasks).

Batches: 'mlm' {input_ids, attention_mask, token_type_ids (optional), targets, weights};
'clm' {input_ids, attention_mask, targets (already shifted: targets[t] = input_ids[t + 1]),
weights}; 'classification' {image (B, H, W, C), label (B,) int, weights or example_weight (optional,
(B,))}.

`evaluate_ptq` follows paper.md §4: the FP metric, then for each PTQ seed its calibration
batches (a function of the seed, or drawn from a pool per config.calibration_order: a random
subset per seed, or the first N in order as the reference's BERT), weights quantized once,
sequential calibration, quantized evaluation; mean ± std (population std, ddof=0) over seeds.
`quantize` picks what is quantized: 'both' (W8A8), 'weights' (activations in full precision,
no calibration, one run) or 'activations' (weights in full precision).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import numpy as np

from qtransformers.models.tasks import SUM_KEYS, Task, get_task
from qtransformers.nn.quant_point import QRANGES, QuantContext, quant_context
from qtransformers.quant.calibrate import (Batch, TaskApply, discover_points,
                                           calibrate, flatten_points, resolve_task)
from qtransformers.quant.config import QuantConfig, optional_points
from qtransformers.quant.params import quantize_params

METRIC_KEYS = SUM_KEYS
QUANTIZE_MODES = ("both", "weights", "activations")


def task_metrics(task: str | Task, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Summed {'loss_sum', 'correct_sum', 'weight_sum'} of one batch (Task.metric_sums).

    Args:
      logits: (B, T, V) for 'mlm' / 'clm', (B, C) for 'classification'.
    """
    return get_task(task).metric_sums(logits, batch)


def summarize(task: str | Task, sums: Mapping[str, Any]) -> dict[str, float]:
    """Host: {'loss', 'accuracy' (fraction), 'perplexity' (text tasks)} (Task.finalize)."""
    return get_task(task).finalize(sums)


def headline_metric(task: str | Task) -> str:
    """'perplexity' for text tasks, 'accuracy' for classification (the paper's columns)."""
    return get_task(task).headline_metric


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


@functools.lru_cache(maxsize=32)
def _eval_jit(apply_fn: TaskApply) -> Callable[[Any, Batch], dict]:
    # One compiled program per model and task, shared by every make_eval_fn call.
    @jax.jit
    def fn(params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits = apply_fn({"params": params}, batch, [])[0]
        return task_metrics(apply_fn.task, logits, batch)

    return fn


def make_eval_fn(model: nn.Module, task: str | Task | None = None) -> Callable[[Any, Batch], dict]:
    """Jitted full-precision `fn(params, batch) -> {'loss_sum', 'correct_sum', 'weight_sum'}`.

    Pass quantize_params(params, config) for weights-only quantization (activations in full
    precision). Args: params (the model's param tree), batch (see the module docstring).
    """
    return _eval_jit(TaskApply(model, resolve_task(model, task)))


def _quantized_traced(apply_fn: TaskApply, ctx: QuantContext) -> Callable[..., dict]:
    def traced(params: Any, qranges: Any, batch: Batch) -> dict[str, jax.Array]:
        variables = {"params": params}
        if qranges:
            variables[QRANGES] = qranges
        with quant_context(ctx):
            logits = apply_fn(variables, batch, [])[0]
        return task_metrics(apply_fn.task, logits, batch)

    return traced


@functools.lru_cache(maxsize=32)
def _quantized_eval_jit(apply_fn: TaskApply, ctx: QuantContext) -> Callable[..., dict]:
    # One compiled program per model, task and static context (bits, granularity, points).
    return jax.jit(_quantized_traced(apply_fn, ctx))


def make_quantized_eval_fn(model: nn.Module, task: str | Task | None, config: QuantConfig, *,
                           validate: bool = True,
                           max_traces: int | None = None) -> Callable[[Any, Any, Batch], dict]:
    """`fn(params, qranges, batch) -> {'loss_sum', 'correct_sum', 'weight_sum'}` with fake-quantized acts.

    params should already be weight-quantized (quantize_params). qranges: the calibrated
    collection (None / {} for act_granularity='per_token'). Activation bits and granularity come
    from config (static); the ranges are traced, so changing them never recompiles. Calls with
    the same model, task and activation settings share one compiled program.

    Args:
      validate: check qranges against the model's QuantPoints on the host before each call
        (points discovered once, on the first batch).
      max_traces: if set, wrap the traced function in chex.assert_max_traces(n=max_traces)
        (a program of its own, not shared).
    """
    apply_fn = TaskApply(model, resolve_task(model, task))
    optional = optional_points(config)
    ctx = QuantContext(bits=config.act_bits, granularity=config.act_granularity,
                       optional_points=optional)
    dynamic = config.act_granularity == "per_token"
    if max_traces is not None:
        jitted = jax.jit(chex.assert_max_traces(_quantized_traced(apply_fn, ctx), n=max_traces))
    else:
        jitted = _quantized_eval_jit(apply_fn, ctx)
    expected: list[list[str]] = []

    def fn(params: Any, qranges: Any, batch: Batch) -> dict[str, jax.Array]:
        if validate and not dynamic:
            if not expected:
                expected.append(discover_points(apply_fn, params, batch, optional=optional))
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


def calibration_batches_fn(pool: Sequence[Batch],
                           config: QuantConfig) -> Callable[[int], list[Batch]]:
    """seed -> the calibration batches of `pool` per config.calibration_order.

    'random': config.num_calibration_batches distinct batches drawn by seed (random_subset_fn);
    'first': the first config.num_calibration_batches of `pool`, in order, for every seed (the
    reference's BERT protocol: the first 16 validation batches).
    """
    if not pool:
        raise ValueError("the calibration pool is empty; pass at least one batch")
    if config.calibration_order == "random":
        return random_subset_fn(pool, config.num_calibration_batches)
    first = list(pool[:config.num_calibration_batches])
    return lambda seed: first


def check_quantize_mode(quantize: str) -> str:
    """Validates a `quantize` mode ('both' | 'weights' | 'activations'); returns it."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    return quantize


def ptq_params(params: Any, config: QuantConfig, quantize: str = "both") -> Any:
    """The weights a `quantize` mode evaluates with: quantize_params unless 'activations'."""
    if check_quantize_mode(quantize) == "activations":
        return params
    return quantize_params(params, config)


def ptq_label(config: QuantConfig, quantize: str = "both") -> str:
    """'W8A8', 'W8 (FP acts)' or 'A8 (FP weights)' for a config and `quantize` mode."""
    mode = check_quantize_mode(quantize)
    if mode == "weights":
        return f"W{config.weight_bits} (FP acts)"
    if mode == "activations":
        return f"A{config.act_bits} (FP weights)"
    return f"W{config.weight_bits}A{config.act_bits}"


def evaluate_ptq(model: nn.Module, params: Any, eval_batches: Sequence[Batch],
                 calib_batches: Callable[[int], Iterable[Batch]] | Sequence[Batch],
                 config: QuantConfig, seeds: Sequence[int] | None = None, *,
                 task: str | Task | None = None, sequential: bool = True,
                 quantize: str = "both") -> dict[str, Any]:
    """FP metric and W{b}A{b} mean ± std over PTQ seeds (paper.md §4, §7).

    Args:
      eval_batches: a re-iterable sequence of evaluation batches.
      calib_batches: seed -> iterable of calibration batches (its first
        config.num_calibration_batches are used, in order), or a pool (sequence) to draw them
        from per config.calibration_order (calibration_batches_fn).
      seeds: PTQ seeds (default config.seeds); per_token activations and quantize='weights'
        run once (no calibration).
      quantize: 'both' | 'weights' (FP activations) | 'activations' (FP weights).
    Returns:
      {'task', 'metric', 'fp': summarize(...), 'quantized': {'per_seed': [{'seed', 'loss',
       'perplexity' / 'accuracy'}], 'mean', 'std'}, 'qranges': {seed: qranges}, 'config',
       'quantize'}.
    """
    task = resolve_task(model, task)
    check_quantize_mode(quantize)
    seeds = tuple(config.seeds if seeds is None else seeds)
    if not seeds:
        raise ValueError("seeds must name at least one PTQ seed")
    calib_fn = calib_batches if callable(calib_batches) else calibration_batches_fn(
        calib_batches, config)
    eval_batches = list(eval_batches)
    fp_eval = make_eval_fn(model, task)
    fp = summarize(task, sum_metrics(fp_eval, (params,), eval_batches))
    qparams = ptq_params(params, config, quantize)
    qeval = make_quantized_eval_fn(model, task, config)
    metric = headline_metric(task)
    calibrated = quantize != "weights" and config.act_granularity != "per_token"
    per_seed, all_ranges = [], {}
    for seed in seeds if calibrated else seeds[:1]:
        if quantize == "weights":
            result = summarize(task, sum_metrics(fp_eval, (qparams,), eval_batches))
        else:
            qranges = None
            if calibrated:
                qranges = calibrate(model, qparams, calib_fn(seed), config, task=task,
                                    sequential=sequential)
                all_ranges[seed] = qranges
            result = summarize(task, sum_metrics(qeval, (qparams, qranges), eval_batches))
        per_seed.append({"seed": seed, **result})
    values = np.asarray([r[metric] for r in per_seed], np.float64)
    return {"task": task.name, "metric": metric, "fp": fp,
            "quantized": {"per_seed": per_seed, "mean": float(values.mean()),
                          "std": float(values.std())},
            "qranges": all_ranges, "config": config.to_dict(), "quantize": quantize}
