"""Before / after measurements of a retrofitted sentence encoder on the held-out retrieval task.

measure(task, model, params, ...) -> {
  'fp': {'recall@1', 'recall@10', 'mrr', ...},
  'w8a8': the same under paper W8A8 (per-tensor static ranges, preset w8a8_bert) + 'cos mean',
  'w8a{bits}': the same at act_bits (per-tensor),
  'w8_only' / 'a8_only' (split=True): W8A8's weights alone (activations at 16 bits) and its
    activations alone (weights at 16 bits): which half of W8A8 loses the recall,
  'outliers': {'max_abs': the largest max|x| over all token sites, 'site': where,
               'channel': its top channel, 'peak_over_median': that site's max|x| over the
               median of its channels' max|x|, 'cls_share': the share of probe texts whose
               largest |x| in that channel sits at position 0 ([CLS]),
               'max_peak_over_median': the largest peak / median over all token sites,
               'per_layer': [{'layer', 'site', 'max |x|', 'kurtosis', 'top channel',
                              'peak / median channel'} for the residual sums and block outputs]}}
The outlier statistics come from evaluate.quantizability (site_table, outlier_tokens) on the
task's first `probe_batches` evaluation batches (its shortest texts).
"""
from __future__ import annotations

from typing import Any

from qtransformers.evaluate.quantizability import ATTENTION_KINDS, outlier_tokens, site_table
from qtransformers.quant.config import QuantConfig, get_preset

PER_LAYER_SITES = ("attention_residual", "mlp_residual", "mlp_ln/output")


def outlier_summary(task: Any, model: Any, params: Any, probe_batches: int) -> dict[str, Any]:
    """The 'outliers' entry of measure (see module docstring)."""
    rows, channel_max = site_table(task, model, params, probe_batches)
    tokens = [r for r in rows if r["site"].rsplit("/", 1)[-1] not in ATTENTION_KINDS]
    worst = max(tokens, key=lambda r: r["max |x|"])
    hits = outlier_tokens(task, model, params, [worst], channel_max, probe_batches, top_sites=1,
                          top_channels=1)
    per_layer = [{k: r[k] for k in ("layer", "site", "max |x|", "kurtosis", "top channel",
                                    "peak / median channel")}
                 for r in rows if r["layer"] != "-" and r["site"] in PER_LAYER_SITES]
    return {"max_abs": worst["max |x|"], "site": worst["path"], "channel": worst["top channel"],
            "peak_over_median": worst["peak / median channel"],
            "cls_share": hits[0]["share of texts peaking at position 0"] if hits else None,
            "max_peak_over_median": max(r["peak / median channel"] for r in tokens),
            "max_kurtosis": max(r["kurtosis"] for r in tokens),
            "per_layer": sorted(per_layer, key=lambda r: (int(r["layer"]), r["site"]))}


def split_configs(config: QuantConfig) -> dict[str, QuantConfig]:
    """{'w8_only': config with activations at 16 bits, 'a8_only': weights at 16 bits}."""
    return {"w8_only": config.replace(act_bits=16), "a8_only": config.replace(weight_bits=16)}


def measure(task: Any, model: Any, params: Any, *, probe_batches: int = 4,
            calib_batches: int = 8, act_bits: int = 6, seed: int = 0,
            outliers: bool = True, split: bool = True) -> dict[str, Any]:
    """FP / W8A8 / W8A{act_bits} (/ W8 only / A8 only) retrieval and the outlier summary (see
    module docstring)."""
    fp = task.embed(model, params)
    out: dict[str, Any] = {"fp": task.metrics(fp)}
    base = get_preset(task.default_preset).replace(num_calibration_batches=calib_batches)
    configs = [("w8a8", base), (f"w8a{act_bits}", base.replace(act_bits=act_bits))]
    if split:
        configs += list(split_configs(base).items())
    for name, config in configs:
        r = task.evaluate_config(model, params, config, fp=fp, seed=seed)
        out[name] = {**r["metrics"], "cos mean": r["cosine"]["mean"]}
    if outliers:
        out["outliers"] = outlier_summary(task, model, params, probe_batches)
    return out


def quick_recall(task: Any, model: Any, params: Any, calib_batches: int = 4,
                 seed: int = 0) -> dict[str, float]:
    """{'fp_recall@1', 'w8a8_recall@1'} for the curves during training."""
    fp = task.embed(model, params)
    config = get_preset(task.default_preset).replace(num_calibration_batches=calib_batches)
    r = task.evaluate_config(model, params, config, fp=fp, seed=seed)
    return {"fp_recall@1": task.metrics(fp)["recall@1"],
            "w8a8_recall@1": r["metrics"]["recall@1"]}
