"""Where does the quantized model lose its quality? One group of quantizers at a time.

    report = quantization_sensitivity(model, params, eval_batches, calib_batches, config)
    report["weights_only"]["loss_change"], report["activations_only"]["loss_change"]
    report["groups"]["mlp_residual"]  # {'loss_change', 'num_points', 'max_range', 'points'}

Each entry is the loss change (nats, quantized minus full precision) on `eval_batches` with only
that part of the model quantized: all weights (activations in full precision); all activation
QuantPoints (weights in full precision); and each group of activation points alone (the others
and the weights in full precision). Groups are QuantPoints of one kind ('kind': the last path
element, e.g. every layer's 'mlp_residual'), of one layer ('layer': the 'layers_N' element), or
single points ('point'). The activation ranges are calibrated once, with full-precision weights
and all points quantized in sequence (the reference's calibration): each group is evaluated
with the ranges it has in the activations-only model (the full W8A8 model calibrates with
quantized weights, so its ranges differ slightly).

Loss changes are not additive (quantization noise of several sites interacts), but a group
whose own loss change is near the activations-only one is where the activation error comes from.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import numpy as np

from qtransformers.quant.calibrate import (Batch, calibrate, flatten_points, resolve_task,
                                           unflatten_points)
from qtransformers.quant.config import QuantConfig
from qtransformers.quant.evaluate import (make_eval_fn, make_quantized_eval_fn, sum_metrics,
                                          summarize)
from qtransformers.quant.params import quantize_params

GROUPINGS = ("kind", "layer", "point")
_LAYER = re.compile(r"(^|/)(layers_\d+)(/|$)")


def group_of(path: str, group_by: str) -> str:
    """The group name of a QuantPoint path: its last element ('kind'), its 'layers_N' element
    ('layer'; 'other' outside the layer stack) or the path itself ('point')."""
    if group_by == "kind":
        return path.rsplit("/", 1)[-1]
    if group_by == "layer":
        match = _LAYER.search(path)
        return match.group(2) if match else "other"
    if group_by == "point":
        return path
    raise ValueError(f"group_by must be one of {GROUPINGS}, got {group_by!r}")


def quantization_sensitivity(model: nn.Module, params: Any, eval_batches: Sequence[Batch],
                             calib_batches: Iterable[Batch], config: QuantConfig, *,
                             group_by: str = "kind", task: str | None = None) -> dict[str, Any]:
    """Loss change of the weights alone, the activations alone and each activation group alone.

    Args:
      model: one of our models (QuantPoints at the paper's activation sites).
      params: full-precision params.
      eval_batches: a re-iterable sequence of task batches.
      calib_batches: calibration batches (at most config.num_calibration_batches are used).
      config: QuantConfig with per-tensor activations (per-token ranges have nothing to group).
      group_by: 'kind' | 'layer' | 'point' (see group_of).
      task: 'mlm' | 'clm' | 'classification'; None infers it from the model.
    Returns:
      {'task', 'group_by', 'fp_loss', 'weights_only': {'loss_change'},
       'activations_only': {'loss_change', 'num_points'},
       'groups': {name: {'loss_change', 'num_points', 'max_range', 'points'}}} with groups in
      the order of the calibrated ranges' paths; max_range = the largest calibrated
      x_max - x_min of the group's points.
    """
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {GROUPINGS}, got {group_by!r}")
    if config.act_granularity != "per_tensor":
        raise ValueError("quantization_sensitivity needs calibrated per-tensor activation ranges; "
                         f"got act_granularity={config.act_granularity!r}")
    task = resolve_task(model, task)
    eval_batches = list(eval_batches)

    def loss_of(eval_fn: Any, *args: Any) -> float:
        return summarize(task, sum_metrics(eval_fn, args, eval_batches))["loss"]

    fp_loss = loss_of(make_eval_fn(model, task), params)
    ranges = flatten_points(calibrate(model, params, calib_batches, config, task=task))
    # validate=False: a subset of the ranges is the point here; the missing points stay FP.
    quantized_eval = make_quantized_eval_fn(model, task, config, validate=False)
    weights_only = loss_of(quantized_eval, quantize_params(params, config), {})
    activations_only = loss_of(quantized_eval, params, unflatten_points(ranges))

    members: dict[str, list[str]] = {}
    for path in ranges:
        members.setdefault(group_of(path, group_by), []).append(path)
    groups = {}
    for name, paths in members.items():
        subset = unflatten_points({p: ranges[p] for p in paths})
        widths = [float(np.asarray(ranges[p]["x_max"]) - np.asarray(ranges[p]["x_min"]))
                  for p in paths]
        groups[name] = {"loss_change": loss_of(quantized_eval, params, subset) - fp_loss,
                        "num_points": len(paths), "max_range": max(widths), "points": paths}
    return {"task": task.name, "group_by": group_by, "fp_loss": fp_loss,
            "weights_only": {"loss_change": weights_only - fp_loss},
            "activations_only": {"loss_change": activations_only - fp_loss,
                                 "num_points": len(ranges)},
            "groups": groups}


def sensitivity_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (quantized part, points, max range, loss change) of a sensitivity report."""
    rows = [{"quantized": "weights only", "points": "", "max range": "",
             "loss change (nats)": report["weights_only"]["loss_change"]},
            {"quantized": "activations only", "points": report["activations_only"]["num_points"],
             "max range": "", "loss change (nats)": report["activations_only"]["loss_change"]}]
    for name, g in report["groups"].items():
        rows.append({"quantized": f"{report['group_by']} {name}", "points": g["num_points"],
                     "max range": g["max_range"], "loss change (nats)": g["loss_change"]})
    return rows
