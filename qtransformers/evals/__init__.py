"""Evaluators shared by the trainer, `qtransformers evaluate` and `reproduce`.

Layering: ops -> nn -> models -> quant -> evals -> train / evaluate / reproduce -> cli. The
trainer runs `config.evals` periodically, `qtransformers evaluate` runs evaluators on a
checkpoint and `reproduce` after training, all through `build_evaluators` and `Evaluator.run`
(qtransformers.evals.registry documents the config schema and how to add a type).
"""
from qtransformers.evals.data import (CALIBRATION_SEED_OFFSET, DataConfigEvalData, EvalData,
                                      RandomEvalData, calibration_seed)
from qtransformers.evals.registry import (COMMON_SETTINGS, Evaluator, build_evaluator,
                                          build_evaluators, evaluation_models, evaluator_types,
                                          for_evaluation, register_evaluator, run_evaluators,
                                          train_evals)

__all__ = [
    "CALIBRATION_SEED_OFFSET", "COMMON_SETTINGS", "DataConfigEvalData", "EvalData", "Evaluator",
    "RandomEvalData", "build_evaluator", "build_evaluators", "calibration_seed",
    "evaluation_models", "evaluator_types", "for_evaluation", "register_evaluator",
    "run_evaluators", "train_evals",
]
