"""The built-in evaluator types: fp, outliers, block_outliers, ptq, sensitivity.

Each reads its batches from an EvalData (qtransformers.evals.data) and returns a result dict;
`Evaluator.scalars` flattens it for the metric logs. See qtransformers.evals.registry for the
config schema and how to add a type.
"""
from __future__ import annotations

from typing import Any, Mapping

from qtransformers.evals.block_outliers import collect_block_outliers
from qtransformers.evals.data import EvalData
from qtransformers.evals.outliers import collect_outlier_metrics
from qtransformers.evals.registry import Evaluator, register_evaluator
from qtransformers.quant.calibrate import flatten_points
from qtransformers.quant.config import PRESETS, QuantConfig, get_preset
from qtransformers.quant.evaluate import (QUANTIZE_MODES, evaluate_ptq, make_eval_fn,
                                          ptq_label, ptq_params, sum_metrics)
from qtransformers.quant.sensitivity import GROUPINGS, quantization_sensitivity


@register_evaluator("fp")
class FpEvaluator(Evaluator):
    """Full-precision loss, accuracy (fraction) and perplexity (text) over the eval batches."""

    def run(self, model: Any, params: Any, data: EvalData) -> dict[str, Any]:
        batches = data.eval_batches(self.num_batches, self.batch_size)
        return self.task.finalize(sum_metrics(make_eval_fn(model, self.task), (params,),
                                              batches))

    def summary(self, result: Mapping[str, Any]) -> str:
        text = f"loss {result['loss']:.4f} | accuracy {result['accuracy']:.4f}"
        return text + (f" | perplexity {result['perplexity']:.2f}"
                       if "perplexity" in result else "")


@register_evaluator("outliers")
class OutliersEvaluator(Evaluator):
    """The paper's outlier metrics of the tracked tensors ('max_inf_norm', 'avg_kurtosis', per
    tensor 'inf_norm/<path>', 'kurtosis/<path>'; qtransformers.evals.outliers). block_view=True
    adds the block-output view (BlockOutliersEvaluator's 'block_*' and first-token keys)."""

    settings = {"block_view": False}
    needs_quant_points = True
    block_fn: Any = None  # the trainer's custom outlier hook for the block view, if any

    def run(self, model: Any, params: Any, data: EvalData) -> dict[str, Any]:
        batches = data.eval_batches(self.num_batches, self.batch_size)
        out_sharding = getattr(data, "out_sharding", None)
        result = collect_outlier_metrics(model, params, batches, task=self.task,
                                         valid_rows=self.task.valid_rows,
                                         out_sharding=out_sharding)
        if self.block_view:
            result.update(collect_block_outliers(model, model.config.family, params, batches,
                                                 self.task.valid_rows, self.block_fn,
                                                 out_sharding))
        return result

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        out = super().scalars(result)
        for path, entry in result.get("per_tensor", {}).items():
            out[f"inf_norm/{path}"] = float(entry["inf_norm"])
            if "kurtosis" in entry:
                out[f"kurtosis/{path}"] = float(entry["kurtosis"])
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        return (f"avg kurtosis {result['avg_kurtosis']:.2f} | max inf-norm "
                f"{result['max_inf_norm']:.2f}")


@register_evaluator("block_outliers")
class BlockOutliersEvaluator(Evaluator):
    """The cheap block-output view: 'block_kurtosis', 'block_max_inf_norm', first-token vs rest
    max |x| and the first token's attention share (qtransformers.evals.block_outliers)."""

    needs_quant_points = True  # reads the sown attention probabilities
    block_fn: Any = None

    def run(self, model: Any, params: Any, data: EvalData) -> dict[str, Any]:
        batches = data.eval_batches(self.num_batches, self.batch_size)
        return collect_block_outliers(model, model.config.family, params, batches,
                                      self.task.valid_rows, self.block_fn,
                                      getattr(data, "out_sharding", None))


class _QuantEvaluator(Evaluator):
    """Shared settings of the PTQ evaluators: preset ('' = the task's default), calibration
    batches (0 = the preset's) and their rows (0 = the preset's)."""

    settings = {"preset": "", "num_calib_batches": 0, "calib_batch_size": 0}
    needs_quant_points = True

    def check(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"evals.{self.name}.preset={self.preset!r} is unknown; choose one "
                             f"of {tuple(PRESETS)}.")

    def quant_config(self, **extra: Any) -> QuantConfig:
        """The preset with this evaluator's calibration overrides."""
        config = get_preset(self.preset or self.task.default_ptq_preset)
        overrides = dict(extra)
        if self.num_calib_batches:
            overrides["num_calibration_batches"] = self.num_calib_batches
        if self.calib_batch_size:
            overrides["calibration_batch_size"] = self.calib_batch_size
        return config.replace(**overrides)

    def calibration(self, data: EvalData, config: QuantConfig) -> Any:
        """seed -> calibration batches (EvalData.calibration_batches, the same in every path)."""
        return lambda seed: data.calibration_batches(seed, config.num_calibration_batches,
                                                     config.calibration_batch_size)


@register_evaluator("ptq")
class PtqEvaluator(_QuantEvaluator):
    """Post-training quantization (paper.md §4): FP metric, then per PTQ seed calibration and
    the quantized metric; mean ± std over seeds (quant.evaluate.evaluate_ptq).

    Settings: seeds (PTQ seeds), quantize ('both' | 'weights' | 'activations'),
    quantized_outliers (also the outlier metrics of the first seed's quantized model).
    """

    settings = {**_QuantEvaluator.settings, "seeds": (0,), "quantize": "both",
                "quantized_outliers": False}

    def check(self) -> None:
        super().check()
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"evals.{self.name}.quantize={self.quantize!r} is unknown; choose "
                             f"one of {QUANTIZE_MODES}.")
        try:
            self.config["seeds"] = tuple(int(s) for s in self.seeds)
        except (TypeError, ValueError) as err:
            raise ValueError(f"evals.{self.name}.seeds={self.seeds!r} must be a list of "
                             "integers.") from err
        if not self.seeds:
            raise ValueError(f"evals.{self.name}.seeds must name at least one PTQ seed.")

    def run(self, model: Any, params: Any, data: EvalData) -> dict[str, Any]:
        batches = data.eval_batches(self.num_batches, self.batch_size)
        config = self.quant_config(seeds=self.seeds)
        ptq = evaluate_ptq(model, params, batches, self.calibration(data, config), config,
                           self.seeds, task=self.task, quantize=self.quantize)
        ptq["label"] = ptq_label(config, self.quantize)
        if self.quantized_outliers and ptq["qranges"]:
            ptq["outliers_quantized"] = collect_outlier_metrics(
                model, ptq_params(params, config, self.quantize), batches, task=self.task,
                qranges=ptq["qranges"][self.seeds[0]], config=config,
                valid_rows=self.task.valid_rows)
        ptq["qranges"] = {str(s): {p: [float(v["x_min"]), float(v["x_max"])]
                                   for p, v in flatten_points(q).items()}
                          for s, q in ptq["qranges"].items()}
        return ptq

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        metric, quantized = result["metric"], result["quantized"]
        out = {f"fp_{k}": float(v) for k, v in result["fp"].items()}
        out.update({f"quantized_{metric}": quantized["mean"],
                    f"quantized_{metric}_std": quantized["std"],
                    "quantized_loss": sum(r["loss"] for r in quantized["per_seed"])
                    / len(quantized["per_seed"])})
        return out

    def summary(self, result: Mapping[str, Any]) -> str:
        q, metric = result["quantized"], result["metric"]
        return (f"FP {metric} {result['fp'][metric]:.4g} | {result['label']} "
                f"{q['mean']:.4g} ± {q['std']:.2g}")


@register_evaluator("sensitivity")
class SensitivityEvaluator(_QuantEvaluator):
    """The loss change of quantizing the weights alone, the activations alone and each group of
    activation quantizers alone (quant.sensitivity), calibrated on PTQ seed `seed`'s batches.

    Settings: group_by ('kind' | 'layer' | 'point'), seed.
    """

    settings = {**_QuantEvaluator.settings, "group_by": "kind", "seed": 0}

    def check(self) -> None:
        super().check()
        if self.group_by not in GROUPINGS:
            raise ValueError(f"evals.{self.name}.group_by={self.group_by!r} is unknown; choose "
                             f"one of {GROUPINGS}.")
        if self.quant_config().act_granularity != "per_tensor":
            raise ValueError(f"evals.{self.name} needs a preset with per-tensor activation "
                             f"ranges; {self.preset!r} has another act_granularity.")

    def run(self, model: Any, params: Any, data: EvalData) -> dict[str, Any]:
        batches = data.eval_batches(self.num_batches, self.batch_size)
        config = self.quant_config()
        return quantization_sensitivity(model, params, batches,
                                        self.calibration(data, config)(self.seed), config,
                                        group_by=self.group_by, task=self.task)

    def scalars(self, result: Mapping[str, Any]) -> dict[str, float]:
        out = {"fp_loss": float(result["fp_loss"]),
               "weights_only_loss_change": float(result["weights_only"]["loss_change"]),
               "activations_only_loss_change": float(
                   result["activations_only"]["loss_change"])}
        out.update({f"loss_change/{name}": float(group["loss_change"])
                    for name, group in result["groups"].items()})
        return out
