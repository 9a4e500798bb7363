"""Post-training quantization (paper.md §4): weight fake quantization, activation calibration at
the QuantPoints, quantized evaluation, and an interceptor for stock Flax models.

    qparams = quantize_params(params, config)
    qranges = calibrate(model, qparams, calib_batches, config)
    sums = make_quantized_eval_fn(model, "clm", config)(qparams, qranges, batch)
    report = evaluate_ptq(model, params, eval_batches, calib_pool, config)  # or seed -> batches
    weights_only = evaluate_ptq(model, params, eval_batches, calib_pool, config,
                                quantize="weights")  # or "activations"
    fp_sums = make_eval_fn(model)(params, batch)
    where = quantization_sensitivity(model, params, eval_batches, calib_batches, config)
"""
from qtransformers.nn.quant_point import (OUTLIERS, QRANGES, QSTATE, QSTATS, QuantContext,
                                          quant_context)
from qtransformers.quant.calibrate import (FAMILY_TASKS, TASKS, TaskApply, calibrate,
                                           calibrate_fn, discover_points, flatten_points,
                                           resolve_task, unflatten_points)
from qtransformers.quant.config import (DEFAULT_EXCLUDE, DEFAULT_HEAD_PATTERNS, DEFAULT_INCLUDE,
                                        PRESET_DOCS, PRESETS, QuantConfig, get_preset,
                                        optional_points, param_is_quantized)
from qtransformers.quant.estimators import (ESTIMATOR_NAMES, MSE, CurrentMinMax, Percentile,
                                            RangeEstimator, RunningMinMax, batch_stats,
                                            get_estimator)
from qtransformers.quant.evaluate import (QUANTIZE_MODES, calibration_batches_fn, evaluate_ptq,
                                          make_eval_fn, make_quantized_eval_fn, ptq_label,
                                          ptq_params, random_subset_fn, summarize, task_metrics,
                                          validate_qranges)
from qtransformers.quant.observer import EstimatorObserver, tail_percentiles
from qtransformers.quant.intercept import (InterceptedApply, OutputInterceptor,
                                           calibrate_intercepted, quantized_apply)
from qtransformers.quant.params import quantize_params, quantize_weight, quantized_param_paths
from qtransformers.quant.sensitivity import group_of, quantization_sensitivity, sensitivity_rows

__all__ = [
    "CurrentMinMax", "DEFAULT_EXCLUDE", "DEFAULT_HEAD_PATTERNS", "DEFAULT_INCLUDE",
    "ESTIMATOR_NAMES", "EstimatorObserver", "FAMILY_TASKS", "InterceptedApply", "MSE",
    "OUTLIERS", "OutputInterceptor", "PRESETS", "PRESET_DOCS", "Percentile", "QUANTIZE_MODES", "QRANGES", "QSTATE", "QSTATS",
    "QuantConfig", "QuantContext", "RangeEstimator", "RunningMinMax", "TASKS", "TaskApply",
    "batch_stats", "calibrate", "calibrate_fn", "calibration_batches_fn", "calibrate_intercepted", "discover_points",
    "evaluate_ptq", "flatten_points", "get_estimator", "get_preset", "group_of", "make_eval_fn",
    "make_quantized_eval_fn", "optional_points", "param_is_quantized", "ptq_label", "ptq_params", "quant_context", "quantize_params",
    "quantization_sensitivity", "quantize_weight", "quantized_apply", "quantized_param_paths",
    "random_subset_fn", "resolve_task", "sensitivity_rows", "summarize", "tail_percentiles",
    "task_metrics", "unflatten_points", "validate_qranges",
]
