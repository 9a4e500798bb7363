"""Activation range calibration: observe small statistics at every QuantPoint, fold them on host.

    qparams = quantize_params(params, config)          # the reference calibrates with
    qranges = calibrate(model, qparams, batches, config)  # weights already quantized

Sequential calibration (`sequential=True`, the reference's protocol, paper.md §4): activation
quantizers are on while the calibration batches run, and each one updates its range on the fly.
For batch k every QuantPoint, in call order, (1) computes this batch's statistics of its input x
(which already carries the quantization of every earlier point in this same pass), (2) folds
them into the estimate after batches 0..k-1 (the `qstate` collection: running min-max /
percentile average, or the summed MSE loss vector), and (3) fake-quantizes x with that updated
range, so the first batch is quantized with its own range. Exactly the reference's
`range_estimator(x) -> set_quant_range -> quantizer(x)`. The fold for (3) runs on device in
float32; the returned ranges are the host estimator's float64 fold of the same statistics.
`sequential=False` is the plain statistics mode: no quantization during calibration.

Only the statistics of `QuantPoint` (estimators.batch_stats: min / max, two quantiles, an
(N,) MSE loss vector, plus a 'finite' flag) leave the device, through one jitted apply with
mutable=['qstats'] that traces once for all batches.

qranges: the Flax collection {'encoder': {'layers_0': {'attention': {'scores': {'x_min': (),
'x_max': ()}}}}, ...}, keyed by QuantPoint paths; pass as `{'params': p, 'qranges': qranges}`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

from qtransformers.models.tasks import Task, families, get_task
from qtransformers.nn.quant_point import QSTATE, QSTATS, QuantContext, quant_context
from qtransformers.quant.config import QuantConfig, optional_points
from qtransformers.quant.observer import EstimatorObserver

# Names of the registered Tasks (qtransformers.models.tasks), kept for callers of these tables.
FAMILY_TASKS = {name: get_task(name).name for name in families()}
TASKS = tuple(dict.fromkeys(FAMILY_TASKS.values()))
TASK_KEYS = {name: get_task(name).input_keys for name in TASKS}
Batch = Mapping[str, Any]
# (variables, batch, mutable collections) -> (model output, mutated collections)
ApplyFn = Callable[[Mapping[str, Any], Batch, list], tuple[Any, Any]]


def resolve_task(model: nn.Module, task: str | Task | None = None) -> Task:
    """The Task: `task` if given (a Task or a name: 'mlm', 'clm', 'classification' = 'image'),
    else the Task of model.config.family."""
    if task is None:
        family = getattr(getattr(model, "config", None), "family", None)
        if family not in families():
            raise ValueError(f"task must be one of {TASKS} (could not infer it from the model's "
                             f"config.family={family!r})")
        return get_task(family)
    if isinstance(task, Task):
        return task
    if task not in TASKS and task != "image":
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return get_task(task)


def check_batch(task: str | Task, batch: Batch, extra: tuple[str, ...] = ()) -> None:
    """Raises ValueError listing the keys a `task` batch lacks."""
    get_task(task).check_batch(batch, extra)


@dataclasses.dataclass(frozen=True)
class TaskApply:
    """Hashable ApplyFn of one of our models (so jitted steps are cached across calls): the
    model called on a batch by its Task (task: a Task or its name). Always deterministic."""

    model: nn.Module
    task: Task

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", resolve_task(self.model, self.task))

    def __call__(self, variables: Mapping[str, Any], batch: Batch,
                 mutable: list) -> tuple[Any, Any]:
        self.task.check_batch(batch)
        batch = {k: v for k, v in batch.items() if k != "predict_positions"}
        return self.task.apply(self.model, variables, batch, mutable=mutable)


def token_mask_of(batch: Batch) -> jax.Array | None:
    """The (B, T) attention_mask of a text batch (statistics skip padding), else None."""
    return batch.get("attention_mask")


def no_token_mask(batch: Batch) -> None:
    """A token-mask function that includes every position."""
    return None


def flatten_points(tree: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{'a': {'b': {'x_min': v}}} -> {'a/b': {'x_min': v}} (leaf dicts keyed by point path)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        out.setdefault("/".join(key[:-1]), {})[key[-1]] = value
    return out


def unflatten_points(points: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Inverse of flatten_points: {'a/b': {'x_min': v}} -> {'a': {'b': {'x_min': v}}}."""
    flat = {tuple(path.split("/")) + (k,): v for path, d in points.items() for k, v in d.items()}
    return flax.traverse_util.unflatten_dict(flat)


def discover_points(apply_fn: ApplyFn, params: Any, batch: Batch,
                    token_mask_fn: Callable[[Batch], Any] = no_token_mask,
                    optional: tuple[str, ...] = ()) -> list[str]:
    """Paths of every QuantPoint (or intercepted output) in call order, from one abstract trace.

    optional: names of the optional QuantPoints to include (config.optional_points(config)).
    """
    recorder: list[str] = []

    def run(p: Any, b: Batch) -> Any:
        with quant_context(QuantContext(optional_points=optional), token_mask_fn(b), recorder):
            return apply_fn({"params": p}, b, [])[0]

    jax.eval_shape(run, params, batch)
    return list(dict.fromkeys(recorder))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _calibration_step(apply_fn: ApplyFn, observer: EstimatorObserver, sequential: bool,
                      token_mask_fn: Callable, optional: tuple[str, ...], params: Any,
                      qstate: Any, batch: Batch) -> Any:
    ctx = QuantContext(bits=observer.bits, observer=observer, sequential=sequential,
                       optional_points=optional)
    with quant_context(ctx, token_mask_fn(batch)):
        _, cols = apply_fn({"params": params, QSTATE: qstate}, batch, [QSTATS])
    return cols[QSTATS]


def warn_unused_batches(batches: Iterable[Any], num_used: int) -> None:
    """Warns (one line) when a sized `batches` holds more than the `num_used` calibration reads."""
    try:
        given = len(batches)  # type: ignore[arg-type]
    except TypeError:  # an iterator: its length is unknown without consuming it
        return
    if given > num_used:
        warnings.warn(f"calibration got {given} batches but uses only the first {num_used} "
                      "(config.num_calibration_batches); raise it to use them all",
                      stacklevel=3)


def calibrate_fn(apply_fn: ApplyFn, params: Any, batches: Iterable[Batch], config: QuantConfig,
                 *, sequential: bool = True,
                 token_mask_fn: Callable[[Batch], Any] = no_token_mask) -> dict[str, Any]:
    """Calibrates the activation ranges of any apply function (see module docstring).

    Args:
      apply_fn: (variables, batch, mutable) -> (output, collections), hashable (e.g. TaskApply
        or quant.intercept.InterceptedApply) so the jitted step is reused across calls.
      params: the params the calibration forward uses (pass quantized weights for PTQ).
      batches: iterable of batches; the first config.num_calibration_batches are read, in
        order (a one-line warning when a sized `batches` holds more).
      config: QuantConfig (act_estimator and its options, act_bits, and the optional points
        of embedding_layout / head).
      sequential: quantize during calibration (True, reference) or statistics only (False).
      token_mask_fn: batch -> (B, T) mask of real tokens or None.
    Returns:
      qranges: nested dict, {'x_min': float32 (), 'x_max': float32 ()} per point path.
    """
    if config.act_granularity == "per_token":
        raise ValueError("act_granularity='per_token' is dynamic and needs no calibration; "
                         "evaluate with qranges=None")
    warn_unused_batches(batches, config.num_calibration_batches)
    observer = EstimatorObserver.from_config(config)
    est = observer.estimator()
    optional = optional_points(config)
    paths: list[str] | None = None
    states: dict[str, Any] = {}
    for i, batch in enumerate(itertools.islice(iter(batches), config.num_calibration_batches)):
        if paths is None:
            paths = discover_points(apply_fn, params, batch, token_mask_fn, optional)
            if not paths:
                raise ValueError("the model has no QuantPoint (or intercepted module) to calibrate")
            states = {p: est.init() for p in paths}
        qstate = unflatten_points({p: observer.state_arrays(states[p]) for p in paths})
        stats = flatten_points(jax.device_get(_calibration_step(
            apply_fn, observer, sequential, token_mask_fn, optional, params, qstate, batch)))
        bad = [p for p in paths if not bool(stats[p]["finite"])]
        if bad:
            raise ValueError(
                f"calibration batch {i} has non-finite (NaN / Inf) activations, first at "
                f"QuantPoint {bad[0]!r} ({len(bad)} point(s) affected in call order); check "
                "that batch's inputs and the weights feeding that site")
        for p in paths:
            states[p] = est.update(states[p], stats[p])
    if paths is None:
        raise ValueError("calibrate got zero batches; pass at least one calibration batch "
                         "(check num_calibration_batches and the data iterator)")
    ranges = {}
    for p in paths:
        lo, hi = est.finalize(states[p])
        ranges[p] = {"x_min": np.float32(lo), "x_max": np.float32(hi)}
    return unflatten_points(ranges)


def calibrate(model: nn.Module, params: Any, batches: Iterable[Batch], config: QuantConfig, *,
              sequential: bool = True, task: str | None = None,
              exclude_padding: bool = True) -> dict[str, Any]:
    """Calibrates the activation ranges of one of our models (BERT / OPT / ViT).

    Args:
      model: a model of qtransformers.models (or any module with QuantPoints called like one).
      params: its params; the reference calibrates with quantized weights
        (`quantize_params(params, config)`), which `evaluate_ptq` passes.
      batches: iterable of task batches (see TaskApply); the first
        config.num_calibration_batches are used, in order (a one-line warning when a sized
        `batches` holds more).
      config: QuantConfig.
      sequential: True = fake quantization on during calibration (reference); False = plain
        statistics of the unquantized activations.
      task: 'mlm' | 'clm' | 'classification'; None infers it from model.config.family.
      exclude_padding: leave padded tokens (attention_mask == 0) out of the statistics.
    Returns:
      qranges (nested dict keyed by QuantPoint paths).
    """
    apply_fn = TaskApply(model, resolve_task(model, task))
    return calibrate_fn(apply_fn, params, batches, config, sequential=sequential,
                        token_mask_fn=token_mask_of if exclude_padding else no_token_mask)
