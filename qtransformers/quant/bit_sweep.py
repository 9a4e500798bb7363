"""The task metric against activation bit width and granularity (weights fixed), one model.

    rows = bit_sweep(model, params, eval_batches, calib_batches, get_preset("w8a8_opt"),
                     settings=[(8, "per_tensor"), (6, "per_tensor"), (6, "per_token")])
    rows[1]["loss"] - fp["loss"]      # what 6-bit per-tensor activations cost, in nats

Every setting is the base QuantConfig with `act_bits` and `act_granularity` replaced; the
weights are quantized once (the base config's weight bits and estimator) and shared by every
setting. Per-tensor settings calibrate static ranges per PTQ seed (sequential calibration, as
evaluate_ptq: the ranges of a 6-bit run are observed with the earlier points already at 6 bits)
and report the mean over seeds; per-token settings are dynamic (no calibration, one run).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import numpy as np

from qtransformers.quant.calibrate import Batch, calibrate, resolve_task
from qtransformers.quant.config import ACT_GRANULARITIES, QuantConfig
from qtransformers.quant.evaluate import (headline_metric, make_eval_fn, make_quantized_eval_fn,
                                          sum_metrics, summarize)
from qtransformers.quant.params import quantize_params

Setting = tuple[int, str]  # (activation bits, 'per_tensor' | 'per_token')
DEFAULT_SETTINGS: tuple[Setting, ...] = tuple(
    (bits, granularity) for granularity in ACT_GRANULARITIES for bits in (8, 6, 5, 4))


def check_settings(settings: Sequence[Sequence[Any]]) -> list[Setting]:
    """[(bits, granularity)] validated (bits 2..16, granularity per ACT_GRANULARITIES)."""
    out = []
    for item in settings:
        if len(item) != 2:
            raise ValueError(f"a bit-sweep setting is (activation bits, granularity), got {item!r}")
        bits, granularity = int(item[0]), str(item[1])
        if granularity not in ACT_GRANULARITIES:
            raise ValueError(f"bit-sweep granularity must be one of {ACT_GRANULARITIES}, got "
                             f"{granularity!r}")
        QuantConfig(act_bits=bits)  # validates the bit width
        out.append((bits, granularity))
    if not out:
        raise ValueError("the bit sweep needs at least one (bits, granularity) setting")
    return out


def degradation(quantized_loss: float, fp_loss: float) -> float:
    """What quantization costs, in nats per token (or per example): quantized − FP loss."""
    return float(quantized_loss) - float(fp_loss)


def bit_sweep(model: nn.Module, params: Any, eval_batches: Sequence[Batch],
              calib_batches: Callable[[int], Sequence[Batch]], base: QuantConfig,
              settings: Sequence[Setting] = DEFAULT_SETTINGS, *, task: str | None = None,
              seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """The FP metric and the metric under each (activation bits, granularity) setting.

    Args:
      model, params: one of our models (BERT / OPT / ViT) and its full-precision params.
      eval_batches: evaluation batches (quant.evaluate's batch format for the task).
      calib_batches: PTQ seed -> calibration batches (the first base.num_calibration_batches
        are read).
      base: weight bits / estimator, activation estimator, head handling; act_bits and
        act_granularity are replaced per setting.
      settings: [(act_bits, granularity)], e.g. DEFAULT_SETTINGS (8, 6, 5, 4 x per-tensor,
        per-token).
      seeds: PTQ seeds of the per-tensor settings (default base.seeds).
    Returns:
      {'metric': 'perplexity' | 'accuracy', 'fp': {'loss', metric}, 'weight_bits',
       'rows': [{'act_bits', 'granularity', 'loss', metric, 'loss_change' (nats vs FP),
                 'per_seed': [loss, ...]}]} in the order of `settings`.
    """
    settings = check_settings(settings)
    task = resolve_task(model, task)
    metric = headline_metric(task)
    seeds = tuple(base.seeds if seeds is None else seeds)
    eval_batches = list(eval_batches)
    fp = summarize(task, sum_metrics(make_eval_fn(model, task), (params,), eval_batches))
    qparams = quantize_params(params, base)
    rows = []
    for bits, granularity in settings:
        config = base.replace(act_bits=bits, act_granularity=granularity)
        qeval = make_quantized_eval_fn(model, task, config)
        results = []
        for seed in (seeds if granularity == "per_tensor" else seeds[:1]):
            qranges = None
            if granularity == "per_tensor":
                qranges = calibrate(model, qparams, list(calib_batches(seed))[
                    :config.num_calibration_batches], config, task=task)
            results.append(summarize(task, sum_metrics(qeval, (qparams, qranges),
                                                       eval_batches)))
        loss = float(np.mean([r["loss"] for r in results]))
        value = float(np.mean([r[metric] for r in results]))
        rows.append({"act_bits": bits, "granularity": granularity, "loss": loss, metric: value,
                     "loss_change": degradation(loss, fp["loss"]),
                     "per_seed": [r["loss"] for r in results]})
    return {"metric": metric, "fp": {"loss": fp["loss"], metric: fp[metric]},
            "weight_bits": base.weight_bits, "rows": rows}

